#!/usr/bin/env python3
"""A loopback S3 endpoint that takes multipart uploads and discards the
bodies: just enough of S3 for backstop's uploader (create, upload part,
complete, abort, head, put), so a benchmark can stream tens of GB without
a disk to hold them. Every part's decoded size is appended to PARTS_LOG as
"UPLOAD_ID PART_NUMBER BYTES", so a run can check the parts were equal.

Usage: discard_s3.py PORT PARTS_LOG   (binds 127.0.0.1 only)
"""
import http.server
import sys
import threading
import urllib.parse
import uuid

PORT = int(sys.argv[1])
LOG = open(sys.argv[2], "a", buffering=1)
LOCK = threading.Lock()
UPLOADS = {}   # upload id -> bytes so far
OBJECTS = {}   # key -> size


def read_body(h):
    """Reads and discards the request body; returns its decoded size."""
    enc = (h.headers.get("Content-Encoding") or "") + (h.headers.get("Transfer-Encoding") or "")
    if "chunked" in enc:
        size = 0
        while True:
            line = h.rfile.readline().strip()
            n = int(line.split(b";")[0], 16)
            if n == 0:
                # Trailers (the checksum), then a blank line.
                while h.rfile.readline().strip():
                    pass
                break
            left = n
            while left:
                left -= len(h.rfile.read(min(left, 1 << 20)))
            h.rfile.readline()
            size += n
        decoded = h.headers.get("x-amz-decoded-content-length")
        return int(decoded) if decoded else size
    left = int(h.headers.get("Content-Length") or 0)
    total = left
    while left:
        got = h.rfile.read(min(left, 1 << 20))
        if not got:
            break
        left -= len(got)
    return total


class S3(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def parts(self):
        u = urllib.parse.urlsplit(self.path)
        return u.path, urllib.parse.parse_qs(u.query, keep_blank_values=True)

    def do_POST(self):
        path, q = self.parts()
        read_body(self)
        if "uploads" in q:
            uid = uuid.uuid4().hex
            with LOCK:
                UPLOADS[uid] = 0
            bucket, _, key = path.lstrip("/").partition("/")
            xml = f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{key}</Key><UploadId>{uid}</UploadId></InitiateMultipartUploadResult>"
            return self.reply(200, xml.encode(), [("Content-Type", "application/xml")])
        uid = q.get("uploadId", [""])[0]
        with LOCK:
            OBJECTS[path] = UPLOADS.pop(uid, 0)
        xml = f"<CompleteMultipartUploadResult><Key>{path}</Key><ETag>\"done\"</ETag></CompleteMultipartUploadResult>"
        return self.reply(200, xml.encode(), [("Content-Type", "application/xml")])

    def do_PUT(self):
        path, q = self.parts()
        size = read_body(self)
        if "partNumber" in q:
            uid, n = q["uploadId"][0], q["partNumber"][0]
            with LOCK:
                UPLOADS[uid] = UPLOADS.get(uid, 0) + size
            LOG.write(f"{uid} {n} {size}\n")
            return self.reply(200, headers=[("ETag", f"\"{uid[:8]}-{n}\"")])
        with LOCK:
            OBJECTS[path] = size
        return self.reply(200, headers=[("ETag", "\"single\"")])

    def do_HEAD(self):
        path, _ = self.parts()
        with LOCK:
            size = OBJECTS.get(path)
        if size is None:
            return self.reply(404)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("ETag", "\"done\"")
        self.end_headers()

    def do_DELETE(self):
        path, q = self.parts()
        with LOCK:
            UPLOADS.pop(q.get("uploadId", [""])[0], None)
            OBJECTS.pop(path, None)
        return self.reply(204)


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), S3).serve_forever()
