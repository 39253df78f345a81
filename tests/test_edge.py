"""The connection edge against hostile peers: limits, deadlines, RFC 9112, guarded connections.

The front door runs here without upstream components (no pool, no pollers), so the tests
can use virtual time: a timeout of 10 s takes no real time and is checked exactly.
"""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

import pytest
import trio

from edgestate.api import create_app
from edgestate.frontdoor import FrontDoor
from edgestate.hypercorn_glue import HypercornBridge
from edgestate.listen import accept_forever, open_listener
from edgestate.services import Services, build_services
from edgestate.views import Views
from tests.conftest import make_config
from tests.wsclient import WsClient

_opened: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _opened:
        await _opened.pop().aclose()


class Door:
    def __init__(self, door: FrontDoor, port: int, services: Services) -> None:
        self.door, self.port, self.services = door, port, services

    async def connect(self, source: str | None = None) -> trio.SocketStream:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=source)
        _opened.append(stream)
        return stream

    async def exchange(self, data: bytes, *, limit: float = 30.0) -> bytes:
        """Send ``data``, then read until the server closes (or ``limit`` seconds)."""
        stream = await self.connect()
        try:
            await stream.send_all(data)
            return await read_all(stream, limit)
        finally:
            await stream.aclose()


async def read_all(stream: trio.SocketStream, limit: float = 30.0) -> bytes:
    out = bytearray()
    with trio.move_on_after(limit):
        try:
            while chunk := await stream.receive_some(65536):
                out += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(out)


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", raw)]


async def start_door(nursery: trio.Nursery, capacity: int = 1000, **server: Any) -> Door:
    cfg = make_config(server=server)
    services = build_services(cfg)
    views = Views(services)
    bridge = HypercornBridge(create_app(services, views), cfg.server, send_timeout=cfg.ws.send_timeout)
    await nursery.start(bridge.run)
    door = FrontDoor(cfg, services, views, bridge, capacity)
    listener = await open_listener("127.0.0.1:0")
    port = listener.socket.getsockname()[1]
    nursery.start_soon(accept_forever, listener, door.handle, nursery)
    return Door(door, port, services)


GET_STATE = b"GET /api/state HTTP/1.1\r\nHost: x\r\n\r\n"


# -- deadlines (virtual time) ---------------------------------------------------------------


async def test_silent_connection_closed_after_header_timeout(nursery, autojump_clock):
    d = await start_door(nursery, header_timeout=7.0)
    stream = await d.connect()
    t0 = trio.current_time()
    assert await read_all(stream) == b""
    assert trio.current_time() - t0 == pytest.approx(7.0, abs=0.01)
    assert d.door.stats()["open"] == 0


async def test_half_open_head_closed_after_header_timeout(nursery, autojump_clock):
    d = await start_door(nursery, header_timeout=7.0)
    stream = await d.connect()
    t0 = trio.current_time()
    await stream.send_all(b"GET /api/state HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
    answer = await read_all(stream)
    assert trio.current_time() - t0 == pytest.approx(7.0, abs=0.01)
    assert statuses(answer) == [408]
    assert d.door.stats()["head_timeouts"] == 1


async def test_head_trickled_byte_by_byte_is_answered(nursery, autojump_clock):
    d = await start_door(nursery)
    stream = await d.connect()
    for byte in GET_STATE[:-1]:
        await stream.send_all(bytes([byte]))
        await trio.sleep(0.01)
    await stream.send_all(GET_STATE[-1:] + b"GET /api/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(await read_all(stream)) == [200, 200]


async def test_trickle_cannot_outlast_the_head_timeout(nursery, autojump_clock):
    d = await start_door(nursery, header_timeout=5.0)
    stream = await d.connect()
    t0 = trio.current_time()
    with trio.move_on_after(60):
        try:
            for byte in b"GET /api/state HTTP/1.1\r\nHost: " + b"x" * 100:
                await stream.send_all(bytes([byte]))
                await trio.sleep(1.0)  # a byte a second keeps no connection alive past 5 s
        except trio.BrokenResourceError:
            pass
    assert trio.current_time() - t0 <= 6.0
    assert d.door.stats()["open"] == 0


async def test_keep_alive_idle_closed_after_keepalive_timeout(nursery, autojump_clock):
    d = await start_door(nursery, keepalive_timeout=3.0)
    stream = await d.connect()
    await stream.send_all(GET_STATE)
    t0 = trio.current_time()
    raw = await read_all(stream)
    assert statuses(raw) == [200]
    assert trio.current_time() - t0 == pytest.approx(3.0, abs=0.01)


async def test_connection_to_an_app_route_is_closed_when_idle(nursery, autojump_clock):
    # Finding: a connection that made one request Hypercorn serves was never closed.
    d = await start_door(nursery, keepalive_timeout=3.0, body_timeout=4.0)
    stream = await d.connect()
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    t0 = trio.current_time()
    raw = await read_all(stream, limit=60)
    assert statuses(raw) == [200]
    assert trio.current_time() - t0 <= 4.5
    await trio.testing.wait_all_tasks_blocked()
    assert d.door.stats()["open"] == 0


async def test_connection_close_on_an_app_route_closes(nursery, autojump_clock):
    d = await start_door(nursery)
    t0 = trio.current_time()
    raw = await d.exchange(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200]
    assert trio.current_time() - t0 < 1.0


async def test_partial_post_body_closed_after_body_timeout(nursery, autojump_clock):
    d = await start_door(nursery, body_timeout=4.0, keepalive_timeout=2.0)
    stream = await d.connect()
    await stream.send_all(b"POST /api/tokens/balances HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"wal")
    t0 = trio.current_time()
    await read_all(stream, limit=60)
    assert trio.current_time() - t0 <= 4.5
    await trio.testing.wait_all_tasks_blocked()
    assert d.door.stats()["open"] == 0


# -- RFC 9112: rejected the same way on every route ------------------------------------------


@pytest.mark.parametrize("path", ["/api/state", "/health", "/nowhere"])
@pytest.mark.parametrize(
    "head, status",
    [
        (b"Host: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Host: x\r\nX-A: b\r\n c\r\n", 400),  # obs-fold
        (b"Host : x\r\n", 400),  # whitespace before the colon
        (b"Host: x\nX-B: y\r\n", 400),  # bare LF
        (b"Host: x\r\nX-C: a\x00b\r\n", 400),  # NUL
        (b"Host: x\r\nX(D): a\r\n", 400),  # a separator in a name
        (b"", 400),  # HTTP/1.1 without Host
        (b"Host: x\r\nHost: y\r\n", 400),
        (b"Host: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n", 400),
    ],
)
async def test_malformed_heads_get_one_400_and_a_close(nursery, path, head, status):
    with trio.fail_after(10):
        d = await start_door(nursery)
        raw = await d.exchange(b"GET " + path.encode() + b" HTTP/1.1\r\n" + head + b"\r\n" + GET_STATE, limit=5)
        assert statuses(raw) == [status]
        assert b'"code": "bad_request"' in raw


async def test_unsupported_version_and_oversized_head(nursery):
    with trio.fail_after(10):
        d = await start_door(nursery, max_header_bytes=2048)
        assert statuses(await d.exchange(b"GET /api/state HTTP/2.0\r\nHost: x\r\n\r\n", limit=5)) == [505]
        big = b"GET /api/state HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
        assert statuses(await d.exchange(big, limit=5)) == [431]
        # Over the limit before the head even ends: refused without waiting for the rest.
        stream = await d.connect()
        await stream.send_all(b"GET /api/state HTTP/1.1\r\nX-Big: " + b"a" * 4096)
        assert statuses(await read_all(stream, 5)) == [431]


async def test_http10_with_a_pipelined_request_answers_once_and_survives(nursery):
    # Finding: this ended the process (BusyResourceError out of Hypercorn into the nursery).
    with trio.fail_after(10):
        d = await start_door(nursery)
        for path in (b"/api/state", b"/health"):
            raw = await d.exchange(b"GET " + path + b" HTTP/1.0\r\n\r\n" + GET_STATE, limit=5)
            assert statuses(raw) == [200]
        assert statuses(await d.exchange(GET_STATE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))) == [200]


async def test_get_with_a_body_is_answered_once(nursery):
    with trio.fail_after(10):
        d = await start_door(nursery)
        raw = await d.exchange(b"GET /api/state HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        assert statuses(raw) == [200]


async def test_websocket_upgrade_to_an_unknown_path_is_404(nursery):
    with trio.fail_after(10):
        d = await start_door(nursery)
        raw = await d.exchange(
            b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", limit=5)
        assert statuses(raw) == [404]


async def test_426_names_the_websocket_version(nursery):
    with trio.fail_after(10):
        d = await start_door(nursery)
        raw = await d.exchange(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", limit=5)
        assert statuses(raw) == [426] and b"sec-websocket-version: 13" in raw.lower()
        # Connection is a token list: "keep-alive, Upgrade" is an upgrade.
        raw = await d.exchange(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", limit=1)
        assert statuses(raw) == [101]


# -- admission ------------------------------------------------------------------------------


async def test_over_capacity_refused_at_once(nursery, caplog):
    with trio.fail_after(10):
        d = await start_door(nursery, capacity=2)
        held = [await d.connect() for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        with caplog.at_level(logging.WARNING, logger="edgestate.frontdoor"):
            for _ in range(3):
                raw = await d.exchange(GET_STATE, limit=2)
                assert statuses(raw) == [503] and b"retry-after: 5" in raw
        assert d.door.stats()["refused_full"] == 3
        assert len([r for r in caplog.records if "refusing" in r.getMessage()]) == 1  # once a minute
        for stream in held:
            await stream.aclose()


async def test_per_client_connection_limit(nursery):
    with trio.fail_after(10):
        d = await start_door(nursery, max_connections_per_client=2)
        held = [await d.connect() for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        assert statuses(await d.exchange(GET_STATE, limit=2)) == [503]
        # Another address is not affected.
        other = await d.connect("127.0.0.2")
        await other.send_all(GET_STATE)
        status_line = await other.receive_some(100)
        assert status_line.startswith(b"HTTP/1.1 200")
        await other.aclose()
        for stream in held:
            await stream.aclose()
        assert d.door.stats()["refused_per_client"] == 1


# -- one connection never takes the server down ---------------------------------------------


@pytest.mark.parametrize("error", [RecursionError, MemoryError, KeyError])
async def test_a_failure_on_one_connection_costs_that_connection_only(nursery, monkeypatch, caplog, error):
    with trio.fail_after(10):
        d = await start_door(nursery)
        good = WsClient(await d.connect())  # used for its HTTP response reading

        async def get_on_good() -> int:
            await good.stream.send_all(GET_STATE)
            status, headers = await good.read_head()
            await good.read_body(int(headers["content-length"]))
            return status

        assert await get_on_good() == 200
        calls = 0
        real = Views.answer

        async def broken(self: Views, *args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise error("injected")
            return await real(self, *args)

        monkeypatch.setattr(Views, "answer", broken)
        with caplog.at_level(logging.ERROR, logger="edgestate.frontdoor"):
            assert await d.exchange(GET_STATE, limit=5) == b""  # that connection: closed
        assert any("connection from 127.0.0.1" in r.getMessage() for r in caplog.records)
        assert await get_on_good() == 200  # the others: still served
        assert d.door.stats()["failures"] == 1


async def test_idle_connections_cost_no_wakeups(nursery):
    # Event-driven reads: 200 half-open heads put no task on the run queue while they wait.
    with trio.fail_after(10):
        d = await start_door(nursery)
        streams = []
        for _ in range(200):
            s = await d.connect()
            await s.send_all(b"GET /api/state HTTP/1.1\r\nHost: x\r\n")
            streams.append(s)
        await trio.testing.wait_all_tasks_blocked()
        stats = trio.lowlevel.current_statistics()
        assert stats.tasks_runnable == 0
        before = trio.lowlevel.current_root_task()
        assert before is not None
        t0 = trio.current_time()
        await trio.sleep(0.2)
        # No deadline other than the header timeout is pending: nothing woke up meanwhile.
        assert trio.current_time() - t0 >= 0.2
        assert d.door.stats()["open"] == 200
        for s in streams:
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            await s.aclose()


async def test_open_files_limit_raised_and_an_oversized_cap_warned_once(caplog):
    import resource

    from edgestate.listen import FD_RESERVE, connection_capacity

    with caplog.at_level(logging.WARNING, logger="edgestate.listen"):
        capacity = connection_capacity(10**9, 10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY  # the soft limit was raised to the hard one
    assert capacity == soft - FD_RESERVE
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "server.max_connections = 1000000000" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgestate.listen"):
        assert connection_capacity(100, 10) == 100
    assert not caplog.records
