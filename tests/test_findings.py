"""The attack findings of issue 10, against the whole server as a client meets it.

Each of these failed on the edge before it was rebuilt (023511a): the process exited,
answered twice, or kept the connection open. They use only the server's public surface
(config defaults, raw sockets), so they run against any version.
"""

from __future__ import annotations

import re

import trio

from tests.conftest import make_config, start_server
from tests.wsclient import WsClient

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


async def _exchange(url: str, data: bytes, limit: float = 3.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    out = bytearray()
    try:
        await stream.send_all(data)
        with trio.move_on_after(limit):
            while chunk := await stream.receive_some(65536):
                out += chunk
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()
    return bytes(out)


def _statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", raw)]


async def test_hostile_heads_answered_once_and_the_server_lives_on(nursery, sim):
    with trio.fail_after(30):
        server = await start_server(nursery, make_config(sim.url, state=FAR))
        url = server.url
        follow = b"GET /api/state HTTP/1.1\r\nHost: x\r\n\r\n"
        # HTTP/1.0 with a request pipelined behind it: used to end the process.
        for path in (b"/api/state", b"/health"):
            assert _statuses(await _exchange(url, b"GET " + path + b" HTTP/1.0\r\n\r\n" + follow)) == [200]
        # A bare LF or a NUL inside the header block: one 400, not two responses.
        assert _statuses(await _exchange(url, b"GET /api/state HTTP/1.1\r\nHost: x\nX: y\r\n\r\n" + follow)) == [400]
        assert _statuses(await _exchange(url, b"GET /api/state HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n" + follow)) == [400]
        # HTTP/1.1 without Host is a 400 on the in-memory routes too.
        assert _statuses(await _exchange(url, b"GET /api/state HTTP/1.1\r\n\r\n")) == [400]
        # A WebSocket upgrade to a path that has none: 404, not 500.
        upgrade = (b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert _statuses(await _exchange(url, upgrade)) == [404]
        # Still serving after all of it.
        assert _statuses(await _exchange(url, follow.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == [200]
        await server.shutdown()


async def test_app_route_with_connection_close_is_closed_by_the_server(nursery, sim):
    with trio.fail_after(30):
        server = await start_server(nursery, make_config(sim.url, state=FAR))
        t0 = trio.current_time()
        raw = await _exchange(server.url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", limit=4)
        assert _statuses(raw) == [200]
        assert trio.current_time() - t0 < 2.0  # closed by the server, not by our 4 s limit
        await server.shutdown()


async def test_recursion_bomb_frame_costs_only_its_connection(nursery, sim, ws_connect):
    with trio.fail_after(30):
        server = await start_server(nursery, make_config(sim.url, state=FAR))
        bystander = await ws_connect(server.url)
        assert (await bystander.message())["type"] == "stateUpdate"
        attacker = await ws_connect(server.url)
        await attacker.message()
        from tests.wsclient import masked

        await attacker.send_raw(masked(0x1, b"[" * 1000))
        # The attacker gets an error or a close; the bystander and the server go on.
        await bystander.send_json({"type": "ping"})
        while (reply := await bystander.message())["type"] == "stateUpdate":
            pass  # a state change may be broadcast meanwhile
        assert reply["type"] == "pong"
        again = await ws_connect(server.url)
        assert (await again.message())["type"] == "stateUpdate"
        assert isinstance(attacker, WsClient)
        await server.shutdown()
