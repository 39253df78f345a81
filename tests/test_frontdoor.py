"""The front door: raw answers for in-memory GETs, hand-off to Hypercorn, keep-alive."""

from __future__ import annotations

import trio
from solders.pubkey import Pubkey

from tests.conftest import make_config, start_server, wait_for
from tests.wsclient import WsClient

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


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


async def test_repeated_price_answered_raw_while_fresh(nursery, sim):
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(sim.url, state=FAR, cache={"method_ttls": {"price": 1.0}}))
        await wait_for(lambda: server.services.state.ready()[0])
        mint = sim.world.token_mint
        host, port = server.url.removeprefix("http://").split(":")

        async def get(extra: str = "") -> tuple[int, dict[str, str], bytes]:
            return await get_path(f"/api/price/{mint}", extra)

        async def get_path(path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
            stream = await trio.open_tcp_stream(host, int(port))
            conn = WsClient(stream)
            try:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
                status, headers = await conn.read_head()
                body = await conn.read_body(int(headers.get("content-length", 0)))
                return status, headers, body
            finally:
                await stream.aclose()

        first_status, first, first_body = await get()  # fetched, then kept in memory
        assert first_status == 200 and first["server"] == "edgestate"
        sim.world.reset_counters()
        status, again, body = await get()
        assert status == 200 and again["server"] == "edgestate"  # the front door, from memory
        assert body == first_body and again["etag"] == first["etag"]
        assert again["cache-control"] == first["cache-control"]
        status, _, _ = await get(f"If-None-Match: {first['etag']}\r\n")
        assert status == 304
        assert sim.world.counters()["price_requests"] == 0
        await trio.sleep(1.1)  # past the price TTL: fetched again
        status, late, _ = await get()
        assert status == 200 and late["server"] == "edgestate"
        assert sim.world.counters()["price_requests"] == 1
        # What memory cannot answer goes to the app: an invalid mint, an unpriced one.
        assert (await get_path("/api/price/not-a-key"))[0] == 400
        assert (await get_path("/api/price/" + str(Pubkey.new_unique())))[0] == 404
        await server.shutdown()
