"""The attack load of ``python -m bench attack``: connections that never finish what they start.

    python -m bench.attacker --port P --addrs 127.1.0.2,... --heads 2000 --ws 500 --bodies 500 --hold 40

Opens, from the given source addresses (loopback only), ``heads`` connections that send
half a request head, ``ws`` that send half a WebSocket handshake and ``bodies`` that send
a whole head announcing a body and then a few bytes of it; then sends nothing more. Prints
one JSON line when all are open ({"event": "open", ...}) and one at the end with how long
the server took to close each ({"event": "done", "closed": n, "close_s": [...]}). Stops by
itself after ``hold`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import trio

HEAD = b"GET /api/state HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n"
WS = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
BODY = (b"POST /api/tokens/balances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60000\r\n\r\n{\"wallets\": [")


class Tally:
    """What the connections did so far; ``changed`` fires on every update."""

    def __init__(self) -> None:
        self.opened: list[float] = []
        self.closed: list[float] = []
        self.failed: list[str] = []
        self.changed = trio.Event()

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.changed.wait()


async def _hold(port: int, source: str, payload: bytes, tally: Tally, limiter: trio.CapacityLimiter) -> None:
    async with limiter:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            await stream.send_all(payload)
        except OSError as exc:
            tally.failed.append(type(exc).__name__)
            tally.note()
            return
    start = time.monotonic()
    tally.opened.append(start)
    tally.note()
    try:
        try:
            while await stream.receive_some(65536):
                pass  # a 408/503 answer, then the close
        except (trio.BrokenResourceError, OSError):
            pass
        # Reached only when the server ended it (EOF or reset), not at our hold limit.
        tally.closed.append(time.monotonic() - start)
        tally.note()
    finally:
        await stream.aclose()


async def main(args: argparse.Namespace) -> None:
    addrs = args.addrs.split(",")
    kinds = [HEAD] * args.heads + [WS] * args.ws + [BODY] * args.bodies
    tally = Tally()
    limiter = trio.CapacityLimiter(200)
    with trio.move_on_after(args.hold):
        async with trio.open_nursery() as nursery:
            for i, payload in enumerate(kinds):
                nursery.start_soon(_hold, args.port, addrs[i % len(addrs)], payload, tally, limiter)
            await tally.wait_until(lambda: len(tally.opened) + len(tally.failed) >= len(kinds))
            opened = tally.opened
            print(json.dumps({"event": "open", "opened": len(opened), "failed": len(tally.failed),
                              "open_s": round(max(opened) - min(opened), 3) if opened else 0}), flush=True)
            await tally.wait_until(lambda: len(tally.closed) >= len(tally.opened))
    print(json.dumps({"event": "done", "opened": len(tally.opened), "closed": len(tally.closed),
                      "close_s": sorted(round(c, 2) for c in tally.closed)}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--addrs", required=True)
    p.add_argument("--heads", type=int, default=2000)
    p.add_argument("--ws", type=int, default=500)
    p.add_argument("--bodies", type=int, default=500)
    p.add_argument("--hold", type=float, default=40.0)
    a = p.parse_args()
    for addr in a.addrs.split(","):
        if not addr.startswith("127."):
            sys.exit("loopback only")
    trio.run(main, a)
