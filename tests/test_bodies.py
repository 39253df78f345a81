"""Upstream bodies are read with a cap: read_capped, the pool and the price client.

The finding (issue 10): an endless price-API body left the process at 5.5 GB RSS. The
fakes here serve endless bodies, through httpx.MockTransport and over loopback TCP.
"""

from __future__ import annotations

import json
import tracemalloc
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from solders.pubkey import Pubkey

from edgestate.cache import Cache
from edgestate.config import CacheConfig, PriceConfig, UpstreamConfig
from edgestate.errors import UpstreamError
from edgestate.upstream.bodies import read_capped
from edgestate.upstream.pool import Pool
from edgestate.upstream.prices import MAX_BODY_BYTES, PriceClient
from edgestate.upstream.ratelimit import RateLimiter

CHUNK = 64 * 1024
MINT = str(Pubkey.new_unique())


class Endless(httpx.AsyncByteStream):
    """A body that never ends (a class, not an async generator: nothing left unfinished)."""

    def __init__(self, chunk: bytes = b"[" + b" " * (CHUNK - 1)) -> None:
        self.chunk = chunk
        self.served = 0
        self.closed = False

    def __aiter__(self) -> Endless:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.closed:  # like a socket: nothing more after close
            raise StopAsyncIteration
        self.served += len(self.chunk)
        return self.chunk

    async def aclose(self) -> None:
        self.closed = True


class Fixed(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> Fixed:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


def _response(stream: httpx.AsyncByteStream, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers=headers, stream=stream, request=httpx.Request("GET", "https://x.test/"))


async def test_read_capped_stops_at_the_cap() -> None:
    endless = Endless()
    assert await read_capped(_response(endless), 10 * CHUNK) is None
    assert endless.served == 11 * CHUNK  # the cap plus the chunk that crossed it, no more
    assert await read_capped(_response(Fixed(b"x" * 100)), 100) == b"x" * 100
    assert await read_capped(_response(Fixed(b"x" * 101)), 100) is None


async def test_read_capped_refuses_a_long_content_length_unread() -> None:
    endless = Endless()
    assert await read_capped(_response(endless, **{"content-length": str(10**12)}), 1024) is None
    assert endless.served == 0


# ---- the price client ------------------------------------------------------------------


async def test_endless_price_body_is_aborted_bounded(autojump_clock: trio.testing.MockClock) -> None:
    streams: list[Endless] = []

    def handler(request: httpx.Request) -> httpx.Response:
        streams.append(Endless())
        return httpx.Response(200, stream=streams[-1])

    client = PriceClient(PriceConfig(url="https://price.test/v3"), Cache(CacheConfig()),
                         transport=httpx.MockTransport(handler), timeout=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        tracemalloc.start()
        try:
            t0 = trio.current_time()
            with pytest.raises(UpstreamError, match=f"over {MAX_BODY_BYTES} bytes"):
                await client.get_price(MINT)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert trio.current_time() - t0 < 1.0
        nursery.cancel_scope.cancel()
    assert len(streams) == 1  # not retried: the same request gets the same body
    assert streams[0].served <= MAX_BODY_BYTES + CHUNK and streams[0].closed
    assert peak < 4 * MAX_BODY_BYTES


async def test_deeply_nested_price_body_is_malformed_not_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    replies = [httpx.Response(200, content=b"[" * 100_000), httpx.Response(200, json={MINT: {"usdPrice": 2.5}})]
    client = PriceClient(PriceConfig(url="https://price.test/v3"), Cache(CacheConfig()),
                         transport=httpx.MockTransport(lambda _: replies.pop(0)))
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with pytest.raises(UpstreamError, match="malformed"):
            await client.get_price(MINT)
        assert (await client.get_price(MINT)).value == 2.5  # the client survived
        nursery.cancel_scope.cancel()


# ---- the pool --------------------------------------------------------------------------


def _pool_cfg(url: str, cap: int) -> UpstreamConfig:
    return UpstreamConfig(rpc_url=(url,), max_connections=2, request_timeout=30.0, max_retries=3,
                          max_requests_per_second=1e6, max_response_bytes=cap)


async def test_endless_rpc_reply_is_aborted_bounded(autojump_clock: trio.testing.MockClock) -> None:
    streams: list[Endless] = []

    def provider(request: httpx.Request) -> httpx.Response:
        streams.append(Endless())
        return httpx.Response(200, stream=streams[-1])

    cap = 1024 * 1024
    pool = Pool(_pool_cfg("https://rpc.test/", cap), RateLimiter(1e6), transport=httpx.MockTransport(provider))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with pytest.raises(UpstreamError, match="max_response_bytes"):
            await pool.execute("getSlot")
        nursery.cancel_scope.cancel()
    assert len(streams) == 1 and streams[0].served <= cap + CHUNK and streams[0].closed


async def test_rpc_reply_under_the_cap_is_read(autojump_clock: trio.testing.MockClock) -> None:
    def provider(request: httpx.Request) -> httpx.Response:
        rid = json.loads(request.content)["id"]
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": rid, "result": "x" * 100_000})

    pool = Pool(_pool_cfg("https://rpc.test/", 200_000), RateLimiter(1e6), transport=httpx.MockTransport(provider))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        assert await pool.execute("getSlot") == "x" * 100_000
        nursery.cancel_scope.cancel()


# ---- over loopback TCP: a real server, a real httpx transport ----------------------------


class EndlessServer:
    """Answers every request with a chunked 200 whose body never ends; counts bytes sent."""

    def __init__(self) -> None:
        self.sent = 0
        self.connections = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await stream.receive_some(65536)  # the request (small): not parsed
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (CHUNK, b" " * CHUNK)
            while True:
                await stream.send_all(chunk)
                self.sent += CHUNK
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up: that is the point
        finally:
            await trio.aclose_forcefully(stream)


async def _serve(nursery: trio.Nursery, server: EndlessServer) -> str:
    listeners: list[Any] = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_endless_bodies_over_loopback_cost_a_bounded_read() -> None:
    server = EndlessServer()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            base = await _serve(nursery, server)
            prices = PriceClient(PriceConfig(url=base + "/price/v3"), Cache(CacheConfig()), timeout=5.0)
            cap = 1024 * 1024
            pool = Pool(_pool_cfg(base + "/", cap), RateLimiter(1e6))
            await nursery.start(prices.run)
            await nursery.start(pool.run)
            with pytest.raises(UpstreamError, match="over"):
                await prices.get_price(MINT)
            with pytest.raises(UpstreamError, match="max_response_bytes"):
                await pool.execute("getSlot")
            nursery.cancel_scope.cancel()
    # What the server got out before the client hung up: the caps plus socket buffers,
    # not the unbounded stream (the old code read until the 10 s fail_after fired).
    assert server.connections == 2
    assert server.sent < MAX_BODY_BYTES + cap + 32 * 1024 * 1024
