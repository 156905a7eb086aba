#!/usr/bin/env python3
"""A TCP proxy on loopback that forwards to a target at a limited rate: a
store slower than the dump, for the benchmarks (bench/s3-backup.sh).

Usage: throttle.py LISTEN_PORT TARGET_PORT BYTES_PER_SECOND [--per-connection] [--both-ways]

By default client-to-target traffic (the uploads) of all connections
together is held to BYTES_PER_SECOND and replies pass unthrottled.

--per-connection: each connection gets BYTES_PER_SECOND of its own (a far
  region, or a managed service's per-connection cap, in front of
  PostgreSQL: parallel streams then add up, one stream does not).
--both-ways: replies are held to the rate too, in a bucket of their own
  (a pg_dump's data flows target-to-client; a restore's client-to-target).

Listens on 127.0.0.1 only and forwards to 127.0.0.1 only. Runs until killed.
"""

import asyncio
import sys
import time


class Bucket:
    """A token bucket: shared by every connection, or one per connection."""

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
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = {a for a in sys.argv[1:] if a.startswith("--")}
    unknown = flags - {"--per-connection", "--both-ways"}
    if len(args) != 3 or unknown:
        sys.exit(__doc__)
    listen, target, rate = int(args[0]), int(args[1]), float(args[2])
    per_connection = "--per-connection" in flags
    both_ways = "--both-ways" in flags
    shared_up, shared_down = Bucket(rate), Bucket(rate)

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        up, down = (Bucket(rate), Bucket(rate)) if per_connection else (shared_up, shared_down)
        await asyncio.gather(
            pipe(client_r, up_w, up), pipe(up_r, client_w, down if both_ways else None)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
