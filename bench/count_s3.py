#!/usr/bin/env python3
"""An HTTP proxy on loopback in front of an S3 server that forwards every
request unchanged (headers too, so SigV4 signatures stay valid) and appends
one line per request to a log: "METHOD PATH?QUERY", so a benchmark can count
what reached the store while it did something (bench/status-page-s3.sh).

Usage: count_s3.py LISTEN_PORT TARGET_PORT LOG

Bodies are forwarded by Content-Length (what backstop's S3 client sends).
Listens on 127.0.0.1 only and forwards to 127.0.0.1 only. Runs until killed.
"""

import http.client
import http.server
import sys
import threading

LISTEN = int(sys.argv[1])
TARGET = int(sys.argv[2])
LOG = open(sys.argv[3], "a", buffering=1)
LOCK = threading.Lock()
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        with LOCK:
            LOG.write(f"{self.command} {self.path}\n")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", TARGET, timeout=300)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
        finally:
            upstream.close()
        self.send_response_only(reply.status, reply.reason)
        head = self.command == "HEAD"
        for k, v in reply.getheaders():
            # A HEAD's Content-Length is the object's: passed on as it is.
            if k.lower() not in HOP and (head or k.lower() != "content-length"):
                self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


Server(("127.0.0.1", LISTEN), Forward).serve_forever()
