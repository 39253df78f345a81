"""The /ws receive side: closing handshakes, RFC 6455 failures, abuse, and one
connection's errors staying on that connection.

Most tests run ``serve_ws`` on one end of a socketpair with a real Hub, on virtual
time (``autojump_clock``): deadlines such as the closing-handshake timeout pass at
once and are asserted exactly. The rest run the whole server on loopback.
"""

from __future__ import annotations

import json
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from edgestate import ws, wsframes
from edgestate.broadcast import Hub
from edgestate.heads import HeadReader
from edgestate.state import SharedState
from tests.conftest import make_config
from tests.test_ws import ready_server
from tests.wsclient import WsClient, masked

PING_JSON = masked(wsframes.OP_TEXT, b'{"type": "ping"}')


class Pair:
    def __init__(self, client: WsClient, hub: Hub, done: trio.Event) -> None:
        self.client, self.hub, self.done = client, hub, done


@asynccontextmanager
async def ws_pair(*, sndbuf: int = 0, extra: bytes = b"", **ws_cfg: object) -> AsyncIterator[Pair]:
    """serve_ws on a socketpair; the test holds the client end."""
    cfg = make_config(ws=ws_cfg)
    hub = Hub(cfg.ws, SharedState(cfg))
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    server_end = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    client_end = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    done = trio.Event()

    async def serve() -> None:
        try:
            # As the front door does: the head is parsed once, the rest handed over.
            reader = HeadReader(server_end, 8192)
            request = await reader.next_request(idle_timeout=10, head_timeout=10)
            assert request is not None
            await ws.serve_ws(server_end, request, bytes(reader.buffer[request.head_size :]), hub, cfg)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        nursery.start_soon(serve)
        client = await WsClient.handshake(client_end, extra=extra)
        assert client.status == 101
        try:
            yield Pair(client, hub, done)
        finally:
            await client_end.aclose()
            with trio.fail_after(10):
                await done.wait()
            nursery.cancel_scope.cancel()


async def test_client_ping_gets_pong_with_its_payload(autojump_clock):
    async with ws_pair() as p:
        assert (await p.client.message())["type"] == "stateUpdate"
        await p.client.send_raw(masked(wsframes.OP_PING, b"hello"))
        assert await p.client.frame() == (wsframes.OP_PONG, b"hello")


async def test_client_close_is_echoed_then_the_server_closes_tcp(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        t0 = trio.current_time()
        await p.client.send_raw(masked(wsframes.OP_CLOSE, struct.pack("!H", 3001) + b"done"))
        # The same code comes back, then EOF: the server closed TCP itself, at once
        # (today it waited for the client to hang up, 1 s).
        frames = await p.client.frames_until_eof()
        assert frames == [(wsframes.OP_CLOSE, struct.pack("!H", 3001))]
        assert trio.current_time() - t0 == 0
        await p.done.wait()
        assert len(p.hub) == 0


async def test_close_without_code_is_answered_1000(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(masked(wsframes.OP_CLOSE, b""))
        assert await p.client.frames_until_eof() == [(wsframes.OP_CLOSE, struct.pack("!H", 1000))]


async def test_bytes_arriving_with_the_handshake_are_read(autojump_clock):
    async with ws_pair(extra=PING_JSON + masked(wsframes.OP_PING, b"p")) as p:
        assert (await p.client.message())["type"] == "stateUpdate"
        assert await p.client.message() == {"type": "pong"}
        assert await p.client.frame() == (wsframes.OP_PONG, b"p")


async def expect_failed(client: WsClient, code: int) -> None:
    """The server sent close ``code`` and closed TCP without waiting for us."""
    t0 = trio.current_time()
    frames = await client.frames_until_eof()
    assert frames[-1][0] == wsframes.OP_CLOSE
    assert wsframes.parse_close(frames[-1][1]) == code
    # Our side never closed: the server dropped the connection itself, at once (FIN
    # right after its close frame; it still reads our input a while, so that no reset
    # destroys the frame). Today it waited 1 s for the client to hang up.
    assert trio.current_time() - t0 == 0


@pytest.mark.parametrize(
    "frame",
    [
        masked(wsframes.OP_TEXT, b'{"type": "ping", "x": "\xff\xfe"}'),
        masked(wsframes.OP_TEXT, b'{"type": "ping"', fin=False) + masked(0, b"\xc0\xaf}"),
        masked(wsframes.OP_TEXT, b'{"x": "\xe2\x82'),
    ],
)
async def test_invalid_utf8_closes_1007(autojump_clock, frame):
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(frame)
        await expect_failed(p.client, 1007)


@pytest.mark.parametrize("payload", [b"\x03", struct.pack("!H", 0), struct.pack("!H", 999), struct.pack("!H", 1004),
                                     struct.pack("!H", 1005), struct.pack("!H", 1016), struct.pack("!H", 2999),
                                     struct.pack("!H", 5000)])
async def test_bad_close_frames_close_1002(autojump_clock, payload):
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(masked(wsframes.OP_CLOSE, payload))
        await expect_failed(p.client, 1002)


async def test_protocol_error_drops_tcp_even_if_the_client_keeps_sending(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(b"\x81\x02hi")  # unmasked

        async def keep_sending() -> None:
            try:
                while True:
                    await p.client.send_raw(PING_JSON)
                    await trio.sleep(0.1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            await expect_failed(p.client, 1002)
            nursery.cancel_scope.cancel()


async def test_server_close_waits_for_the_peers_close_then_closes_tcp(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        for _ in range(10):  # ten strikes: the server closes with 1008
            await p.client.send_raw(masked(wsframes.OP_TEXT, b"{bad"))
        while (frame := await p.client.frame())[0] != wsframes.OP_CLOSE:
            pass
        assert wsframes.parse_close(frame[1]) == 1008
        await trio.sleep(0.5)
        assert not p.done.is_set()  # waiting for our close frame
        t0 = trio.current_time()
        await p.client.send_raw(masked(wsframes.OP_CLOSE, struct.pack("!H", 1008)))
        assert await p.client.frames_until_eof() == []
        assert trio.current_time() - t0 == 0


async def test_server_close_gives_up_on_a_silent_peer_after_the_deadline(autojump_clock):
    async with ws_pair(ping_interval=3600.0) as p:
        await p.client.message()
        for _ in range(10):
            await p.client.send_raw(masked(wsframes.OP_TEXT, b"{bad"))
        t0 = trio.current_time()
        frames = await p.client.frames_until_eof()
        assert wsframes.parse_close(frames[-1][1]) == 1008
        assert trio.current_time() - t0 == pytest.approx(2.0)


async def test_reply_queue_overflow_closes_the_client(autojump_clock):
    # A client that sends pings but never reads: its socket fills, then its bounded
    # reply queue (16); the next reply closes it (1008 "not reading replies").
    async with ws_pair(sndbuf=4096) as p:
        pings = 30  # within the rate burst (40): no strike involved
        for i in range(pings):
            await p.client.send_raw(masked(wsframes.OP_PING, bytes([i]) * 125))
            if p.done.is_set():
                break
        with trio.fail_after(5):
            await p.done.wait()
        assert len(p.hub) == 0
        frames = await p.client.frames_until_eof()
        pongs = [f for f in frames if f[0] == wsframes.OP_PONG]
        assert 0 < len(pongs) < i + 1  # some replies were never sent
        assert not any(f[0] == wsframes.OP_TEXT and b'"error"' in f[1] for f in frames)


async def test_endless_empty_continuation_frames_are_closed_with_bounded_memory(autojump_clock):
    # Today: a text frame with fin=0, then empty continuation frames for ever, grew
    # memory without bound (+301 MB in 35 s) and nothing closed the connection.
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(masked(wsframes.OP_TEXT, b"[", fin=False))
        burst = masked(0, b"", fin=False) * 500
        closed: list[int] = []

        async def read_until_close() -> None:
            while (frame := await p.client.frame())[0] != wsframes.OP_CLOSE:
                pass
            closed.append(wsframes.parse_close(frame[1]))

        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            sent = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until_close)
                try:
                    while not closed and sent < 200_000:
                        await p.client.send_raw(burst)
                        sent += 500
                        await trio.sleep(0.01)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            grown = tracemalloc.get_traced_memory()[0] - start
        finally:
            tracemalloc.stop()
        assert closed == [1008]
        assert sent <= 20 * 500  # closed after a few reads, not after 200,000 frames
        assert grown < 200_000


async def test_ping_flood_is_rate_limited(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(masked(wsframes.OP_PING, b"") * 200)
        frames = await p.client.frames_until_eof()
        assert sum(f[0] == wsframes.OP_PONG for f in frames) <= 40
        assert wsframes.parse_close(frames[-1][1]) == 1008


async def test_fragmented_message_within_limits_is_served(autojump_clock):
    async with ws_pair() as p:
        await p.client.message()
        body = b'{"type": "ping"}'
        frames = [masked(wsframes.OP_TEXT if i == 0 else 0, body[i : i + 1], fin=i == len(body) - 1)
                  for i in range(len(body))]
        await p.client.send_raw(b"".join(frames))
        assert await p.client.message() == {"type": "pong"}
        too_many = masked(wsframes.OP_TEXT, b"{", fin=False) + masked(0, b" ", fin=False) * 40 + masked(0, b"}")
        await trio.sleep(5)  # refill the rate allowance
        await p.client.send_raw(too_many)
        reply = await p.client.message()
        assert reply["type"] == "error" and "too large" in reply["error"]


async def test_deeply_nested_json_is_an_error_reply(autojump_clock):
    # Today: json.loads raised RecursionError and the whole process exited.
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(masked(wsframes.OP_TEXT, b"[" * 4000))
        reply = await p.client.message()
        assert reply["type"] == "error" and "malformed JSON" in reply["error"]
        await p.client.send_raw(PING_JSON)
        assert await p.client.message() == {"type": "pong"}


@pytest.mark.parametrize("error", [MemoryError, RecursionError, RuntimeError])
async def test_unexpected_error_closes_only_that_connection_1011(autojump_clock, monkeypatch, caplog, error):
    def broken(self: object, data: bytes) -> None:
        raise error("injected")

    monkeypatch.setattr(ws._Session, "_on_text", broken)
    async with ws_pair() as p:
        await p.client.message()
        await p.client.send_raw(PING_JSON)
        await expect_failed(p.client, 1011)
    assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_hostile_frames_cost_one_connection_not_the_server(nursery, sim, ws_connect, monkeypatch):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim)
        bystander = await ws_connect(server.url)
        await bystander.message()
        hostile = await ws_connect(server.url)
        await hostile.message()
        await hostile.send_raw(masked(wsframes.OP_TEXT, b"[" * 1000))
        assert (await hostile.message())["type"] == "error"
        # A bug on one connection (injected): that one gets 1011, nobody else notices.
        real = ws._Session._on_text

        def broken(self: ws._Session, data: bytes) -> None:
            if b"boom" in data:
                raise MemoryError
            real(self, data)

        monkeypatch.setattr(ws._Session, "_on_text", broken)
        await hostile.send_json({"type": "boom"})
        assert await hostile.close_code() == 1011
        await hostile.aclose()
        await bystander.send_json({"type": "ping"})
        assert await bystander.message() == {"type": "pong"}
        late = await ws_connect(server.url)  # the server still accepts
        assert (await late.message())["type"] == "stateUpdate"
        assert not server.done.is_set()
        for client in (bystander, late):
            await client.aclose()
        await server.shutdown()


async def test_426_names_the_version_and_connection_is_a_token_list(nursery, sim):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim)
        host, port = server.url.removeprefix("http://").split(":")

        async def handshake(head: str) -> tuple[int, dict[str, str]]:
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(head.encode())
                return await WsClient(stream).read_head()

        status, headers = await handshake("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 426 and headers["sec-websocket-version"] == "13"
        ok = ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert (await handshake(ok))[0] == 101
        # "Upgrade" only as part of another token is not an upgrade request.
        assert (await handshake(ok.replace("keep-alive, Upgrade", "x-upgraded")))[0] == 426
        await server.shutdown()


def test_contract_error_messages_stay_json():
    assert json.loads(ws._error_frame("x")[2:]) == {"type": "error", "error": "x"}
