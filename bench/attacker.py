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

import trio

HEAD = b"GET /api/state HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n"
WS = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
BODY = (b"POST /api/tokens/balances HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 60000\r\n\r\n{\"wallets\": [")


async def _hold(port: int, source: str, payload: bytes, opened: list[float], closed: list[float],
                failed: list[str], limiter: trio.CapacityLimiter, all_open: trio.Event) -> None:
    async with limiter:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            await stream.send_all(payload)
        except OSError as exc:
            failed.append(type(exc).__name__)
            return
    start = time.monotonic()
    opened.append(start)
    try:
        while await stream.receive_some(65536):
            pass  # a 408/503 answer, then the close
        closed.append(time.monotonic() - start)
    except (trio.BrokenResourceError, OSError):
        closed.append(time.monotonic() - start)
    finally:
        await stream.aclose()


async def main(args: argparse.Namespace) -> None:
    addrs = args.addrs.split(",")
    kinds = [HEAD] * args.heads + [WS] * args.ws + [BODY] * args.bodies
    opened: list[float] = []
    closed: list[float] = []
    failed: list[str] = []
    limiter = trio.CapacityLimiter(200)
    all_open = trio.Event()
    with trio.move_on_after(args.hold):
        async with trio.open_nursery() as nursery:
            for i, payload in enumerate(kinds):
                nursery.start_soon(_hold, args.port, addrs[i % len(addrs)], payload, opened, closed, failed,
                                   limiter, all_open)
            while len(opened) + len(failed) < len(kinds):
                await trio.sleep(0.05)
            print(json.dumps({"event": "open", "opened": len(opened), "failed": len(failed),
                              "open_s": round(max(opened) - min(opened), 3) if opened else 0}), flush=True)
            while len(closed) < len(opened):
                await trio.sleep(0.1)
    print(json.dumps({"event": "done", "opened": len(opened), "closed": len(closed),
                      "close_s": sorted(round(c, 2) for c in closed)}), flush=True)


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
