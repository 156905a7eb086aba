#!/usr/bin/env python3
"""A TCP proxy on loopback that forwards to a target at a limited rate: a
store slower than the dump, for the benchmarks (bench/s3-backup.sh).

Usage: throttle.py LISTEN_PORT TARGET_PORT BYTES_PER_SECOND

Client-to-target traffic (the uploads) of all connections together is held
to BYTES_PER_SECOND; replies pass unthrottled. Listens on 127.0.0.1 only and
forwards to 127.0.0.1 only. Runs until killed.
"""

import asyncio
import sys
import time


class Bucket:
    """A token bucket shared by every connection."""

    def __init__(self, rate):
        self.rate = rate
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.rate / 10, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe(reader, writer, bucket):
    try:
        while True:
            data = await reader.read(16384)
            if not data:
                break
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    listen, target, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    bucket = Bucket(rate)

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, bucket), pipe(up_r, client_w, None))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
