"""The front door: raw answers for in-memory GETs, hand-off to Hypercorn, keep-alive."""

from __future__ import annotations

import trio

from edgestate import frontdoor
from tests.conftest import make_config, start_server, wait_for
from tests.wsclient import WsClient

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
PATHS = frozenset({"/api/state"})


def test_classify():
    assert frontdoor.classify(b"GET /ws HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.WEBSOCKET
    assert frontdoor.classify(b"GET /ws?x=1 HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.WEBSOCKET
    assert frontdoor.classify(b"GET /api/state HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.FAST
    assert frontdoor.classify(b"HEAD /api/state HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.FAST
    assert frontdoor.classify(b"GET /api/state?x HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.OTHER
    assert frontdoor.classify(b"GET /api/state HTTP/1.0\r\n\r\n", PATHS) is frontdoor.Kind.OTHER
    assert frontdoor.classify(b"POST /api/state HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.OTHER
    assert frontdoor.classify(b"GET /wsx HTTP/1.1\r\n\r\n", PATHS) is frontdoor.Kind.OTHER
    assert frontdoor.classify(None, PATHS) is frontdoor.Kind.OTHER


async def test_keep_alive_raw_then_handoff_and_pipelining(nursery, sim):
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(sim.url, state=FAR))
        await wait_for(lambda: server.services.state.ready()[0])
        host, port = server.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        conn = WsClient(stream)  # used here only for its HTTP head/body reading
        try:
            for _ in range(3):
                await stream.send_all(b"GET /api/state HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers = await conn.read_head()
                assert status == 200 and headers["server"] == "edgestate"
                body = await conn.read_body(int(headers["content-length"]))
                assert body == server.services.state.snapshot.body
            etag = headers["etag"]
            # Pipelined: a 304, a HEAD, then a route only Hypercorn serves, on one connection.
            await stream.send_all(
                f"GET /api/state HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n".encode()
                + b"HEAD /api/lottery/state HTTP/1.1\r\nHost: x\r\n\r\n"
                + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            status, headers = await conn.read_head()
            assert status == 304 and "content-length" not in headers
            status, headers = await conn.read_head()
            assert status == 200 and int(headers["content-length"]) > 0  # HEAD: no body follows
            status, headers = await conn.read_head()
            assert status == 200
            assert b'"status":"ok"' in await conn.read_body(int(headers["content-length"]))
            api = server.services.extra_stats["api"]()
            assert api["by_route"]["/api/state"] == 4 and api["by_route"]["/health"] == 1
        finally:
            await stream.aclose()
        await server.shutdown()


async def test_connection_close_and_post_goes_to_hypercorn(nursery, sim):
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(sim.url, state=FAR))
        host, port = server.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        conn = WsClient(stream)
        try:
            await stream.send_all(b"GET /api/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, headers = await conn.read_head()
            assert status == 200 and headers["connection"] == "close"
            await conn.read_body(int(headers["content-length"]))
            assert await stream.receive_some(100) == b""  # closed by the server
        finally:
            await stream.aclose()
        stream = await trio.open_tcp_stream(host, int(port))
        conn = WsClient(stream)
        try:
            await stream.send_all(b"POST /api/state HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            status, headers = await conn.read_head()
            assert status == 405 and "GET" in headers["allow"]
        finally:
            await stream.aclose()
        await server.shutdown()
