"""Memory per idle /ws connection: our FrameParser against wsproto's frame layer.

Issue 10 asks for wsproto's frame layer on the receive side if an idle /ws connection
stays within 7.5 KB with it. This measures, on this machine:

A. tracemalloc, in-process: the Python heap held by each candidate per connection,
   fresh and after one small message (the steady idle state), averaged over N objects:
   ``wsframes.FrameParser``, ``wsproto.frame_protocol.FrameProtocol`` (the frame layer
   alone) and ``wsproto.Connection`` (frame layer + connection state).
B. RSS, end to end: ``edgestate serve --demo`` in a subprocess, N idle /ws clients
   (each has read its first stateUpdate), (VmRSS with N - VmRSS before) / N.

Run: ``python -m bench.ws_memory [--clients 2000]`` (about 10 s, loopback only; stops
the server it started by PID).
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import trio
import wsproto
from wsproto.frame_protocol import FrameProtocol

from edgestate import wsframes

from .common import rss_kb

_MESSAGE = b'{"type": "ping"}'


def _masked(payload: bytes) -> bytes:
    mask = b"\x11\x22\x33\x44"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ours() -> object:
    return wsframes.FrameParser(4096, max_fragments=32)


def _ours_used(obj: object) -> None:
    assert isinstance(obj, wsframes.FrameParser)
    obj.feed(_masked(_MESSAGE))


def _frame_layer() -> object:
    return FrameProtocol(client=False, extensions=[])


def _frame_layer_used(obj: object) -> None:
    assert isinstance(obj, FrameProtocol)
    obj.receive_bytes(_masked(_MESSAGE))
    list(obj.received_frames())


def _connection() -> object:
    return wsproto.Connection(wsproto.ConnectionType.SERVER)


def _connection_used(obj: object) -> None:
    assert isinstance(obj, wsproto.Connection)
    obj.receive_data(_masked(_MESSAGE))
    list(obj.events())


def per_object(make: Callable[[], object], use: Callable[[object], None] | None, n: int) -> float:
    """Bytes of Python heap each object holds (after ``use`` when given)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        objects = [make() for _ in range(n)]
        if use is not None:
            for obj in objects:
                use(obj)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del objects
    return held / n


def heap_table(n: int) -> list[tuple[str, float, float]]:
    rows = []
    for name, make, use in [
        ("wsframes.FrameParser (ours)", _ours, _ours_used),
        ("wsproto FrameProtocol (frame layer)", _frame_layer, _frame_layer_used),
        ("wsproto.Connection(SERVER)", _connection, _connection_used),
    ]:
        rows.append((name, per_object(make, None, n), per_object(make, use, n)))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _open_idle_clients(port: int, n: int) -> list[trio.SocketStream]:
    streams = []
    for _ in range(n):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        buf = b""
        while b'"stateUpdate"' not in buf:  # 101, then the first state frame
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("server closed a client during the setup")
            buf += data
        streams.append(stream)
    return streams


async def _rss_run(pid: int, port: int, n: int) -> tuple[int, int]:
    with trio.fail_after(120):
        warm = await _open_idle_clients(port, 50)  # allocator and code paths warmed up
        for s in warm:
            await s.aclose()
        await trio.sleep(1.0)
        before = rss_kb(pid)
        streams = await _open_idle_clients(port, n)
        await trio.sleep(1.0)
        after = rss_kb(pid)
        for s in streams:
            await s.aclose()
    return before, after


def rss_per_connection(n: int, src: str | None = None) -> tuple[int, int]:
    port = _free_port()
    env = {**os.environ, "EDGESTATE_SERVER_MAX_CONNECTIONS_PER_CLIENT": "0"}  # all clients are 127.0.0.1
    if src:  # another checkout's package, for a before/after comparison
        env["PYTHONPATH"] = src
    server = subprocess.Popen(
        [sys.executable, "-m", "edgestate", "serve", "--demo", "--bind", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("edgestate serve --demo did not start") from None
                time.sleep(0.2)
        time.sleep(2.0)  # the demo's first state is ready
        return trio.run(_rss_run, server.pid, port, n)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ws_memory", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2000, help="idle /ws clients for the RSS run (default 2000)")
    p.add_argument("--objects", type=int, default=2000, help="objects per tracemalloc sample (default 2000)")
    p.add_argument("--no-rss", action="store_true", help="only the in-process heap table")
    p.add_argument("--src", help="run the server from this src/ directory (another checkout) instead")
    args = p.parse_args(argv)
    print(f"A. Python heap per object (tracemalloc, mean of {args.objects}), bytes:")
    print(f"   {'candidate':<38} {'fresh':>8} {'after 1 msg':>12}")
    rows = heap_table(args.objects)
    for name, fresh, used in rows:
        print(f"   {name:<38} {fresh:>8.0f} {used:>12.0f}")
    if not args.no_rss:
        before, after = rss_per_connection(args.clients, args.src)
        per = (after - before) / args.clients
        print(f"B. edgestate serve --demo, {args.clients} idle /ws clients: VmRSS {before} -> {after} KB, "
              f"{per:.2f} KB per connection ({'server from ' + args.src if args.src else 'this checkout'})")
        ours_used = rows[0][2]
        for name, _fresh, used in rows[1:]:
            print(f"   with {name} instead: ~{per + (used - ours_used) / 1024:.2f} KB per connection (estimated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
