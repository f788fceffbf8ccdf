#!/usr/bin/env python3
"""Idle keep-alive clients for benches/e2e.sh's `idle` scenario.

Opens N client connections to one proxy, sends one request on each and reads the whole answer,
so that every connection is an idle keep-alive connection the proxy must keep (with whatever
upstream connections it keeps for them). Then prints `READY <open> <answered> <seconds>` and
holds the connections until the file given by --release exists; then sends a second request on
every connection (proving the proxy kept them all open through the measurement), prints
`STILL_OPEN <answered>` and closes everything.

Any refused connection, non-200 answer or short body is counted as a failure, not retried: the
script reports what happened and the caller fails the row.
"""

import argparse
import asyncio
import os
import sys
import time

# Connects in flight at once: well below any listen backlog used by the bench (4096, and
# tokio's default of 1024), so a slow accept loop never drops a SYN.
CONNECT_CONCURRENCY = 200
# Requests in flight at once: the e2e bench's 64 connections, so each proxy keeps about as
# many upstream connections as it does there (not one per client).
REQUEST_CONCURRENCY = 64
# Bound on every single wait on the proxy: a loaded 2-core box answers in milliseconds; a
# proxy that stalls this long has failed the run.
PEER_TIMEOUT = 30.0
# Largest response head read; the upstream's heads are about 200 bytes.
MAX_HEAD = 16384


async def open_one(port, sem):
    async with sem:
        try:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), PEER_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return None


async def exchange(conn, request, body_len, sem):
    """One request and its whole answer; True if it was a 200 with the expected body."""
    reader, writer = conn
    async with sem:
        try:
            writer.write(request)
            await asyncio.wait_for(writer.drain(), PEER_TIMEOUT)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PEER_TIMEOUT)
            if len(head) > MAX_HEAD:
                return False
            lines = head.decode("latin-1").split("\r\n")
            status = lines[0].split(" ")
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and "close" in value.lower():
                    return False  # not a keep-alive connection any more
            if len(status) < 2 or status[1] != "200" or length != body_len:
                return False
            await asyncio.wait_for(reader.readexactly(length), PEER_TIMEOUT)
            return True
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError):
            return False


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=10000)
    p.add_argument("--mode", choices=["fwd", "rev"], required=True,
                   help="fwd: absolute-form request (HTTP_PROXY style); rev: origin-form")
    p.add_argument("--host", default="api.bench.test")
    p.add_argument("--path", default="/small")
    p.add_argument("--body-len", type=int, default=12)
    p.add_argument("--release", required=True, help="hold the connections until this file exists")
    p.add_argument("--hold-max", type=float, default=600.0,
                   help="give up holding after this many seconds (the caller died)")
    a = p.parse_args()

    target = f"http://{a.host}{a.path}" if a.mode == "fwd" else a.path
    request = f"GET {target} HTTP/1.1\r\nHost: {a.host}\r\nUser-Agent: bp-idle\r\n\r\n".encode()

    t0 = time.monotonic()
    csem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    conns = await asyncio.gather(*(open_one(a.port, csem) for _ in range(a.conns)))
    conns = [c for c in conns if c is not None]
    rsem = asyncio.Semaphore(REQUEST_CONCURRENCY)
    ok = await asyncio.gather(*(exchange(c, request, a.body_len, rsem) for c in conns))
    print(f"READY {len(conns)} {sum(ok)} {time.monotonic() - t0:.1f}", flush=True)

    deadline = time.monotonic() + a.hold_max
    while not os.path.exists(a.release) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    again = await asyncio.gather(*(exchange(c, request, a.body_len, rsem) for c in conns))
    print(f"STILL_OPEN {sum(again)}", flush=True)
    for _, writer in conns:
        writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
