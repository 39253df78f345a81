"""PriceClient against httpx.MockTransport: batching, caching, errors, 429 (virtual time)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from solders.pubkey import Pubkey

from edgestate.cache import Cache
from edgestate.config import CacheConfig, PriceConfig
from edgestate.errors import Overloaded, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from edgestate.upstream.prices import PriceClient
from edgestate.upstream.ratelimit import Priority

URL = "https://price.test/price/v3"
SECRET = "sk-TOPSECRET-123456"
MINTS = [str(Pubkey.new_unique()) for _ in range(130)]
A, B, C = MINTS[:3]


class Jupiter:
    """A fake Price API v3: prices every mint in ``prices``; ``script`` overrides replies."""

    def __init__(self, prices: dict[str, Any] | None = None) -> None:
        self.prices = prices if prices is not None else {m: 1.0 + i for i, m in enumerate(MINTS)}
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []
        self.script: list[Callable[[httpx.Request], httpx.Response]] = []

    def ids(self, n: int) -> list[str]:
        return self.requests[n].url.params["ids"].split(",")

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        if self.script:
            return self.script.pop(0)(request)
        ids = request.url.params["ids"].split(",")
        body = {
            m: {"usdPrice": self.prices[m], "blockId": 1, "decimals": 6, "priceChange24h": 0.0}
            for m in ids
            if m in self.prices
        }
        return httpx.Response(200, json=body)


@asynccontextmanager
async def running(upstream: Jupiter, *, api_key: str = "", url: str = URL, **kw: Any) -> AsyncIterator[PriceClient]:
    cfg = PriceConfig(url=url, api_key=api_key)
    client = PriceClient(cfg, Cache(CacheConfig()), transport=httpx.MockTransport(upstream), **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()


async def test_thousand_lookups_of_three_mints_one_request(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    results: list[float | None] = []
    async with running(upstream) as client:

        async def get(mint: str) -> None:
            results.append((await client.get_price(mint)).value)

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(get, (A, B, C)[i % 3])
        assert len(upstream.requests) == 1
        assert sorted(upstream.ids(0)) == sorted([A, B, C])
        assert sorted(set(results)) == [1.0, 2.0, 3.0] and len(results) == 1000
        stats = client.stats()
        assert (stats["requests"], stats["batches"], stats["ids_requested"]) == (1, 1, 3)
        # Cached now: no more requests.
        assert (await client.get_price(B)).value == 2.0
        assert len(upstream.requests) == 1


async def test_120_mints_three_requests_of_at_most_50(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    async with running(upstream) as client:
        prices = await client.get_prices(MINTS[:120])
    assert [len(upstream.ids(i)) for i in range(3)] == [50, 50, 20]
    assert len(upstream.requests) == 3
    assert {m: c.value for m, c in prices.items()} == {m: 1.0 + i for i, m in enumerate(MINTS[:120])}
    # Paced by the price API's 0.5 req/s limit (burst 1).
    assert upstream.times[1] - upstream.times[0] == pytest.approx(2.0)
    assert upstream.times[2] - upstream.times[1] == pytest.approx(2.0)


async def test_api_key_header_only_when_configured(autojump_clock: trio.testing.MockClock) -> None:
    keyless, keyed = Jupiter(), Jupiter()
    async with running(keyless) as client:
        await client.get_price(A)
    async with running(keyed, api_key=SECRET) as client:
        await client.get_price(A)
        assert SECRET not in json.dumps(client.stats()) and SECRET not in repr(client)
    assert "x-api-key" not in keyless.requests[0].headers
    assert keyed.requests[0].headers["x-api-key"] == SECRET
    assert str(keyed.requests[0].url) == f"{URL}?ids={A}"


async def test_unpriced_mint_is_none_and_cached(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter(prices={A: 0.5})
    async with running(upstream) as client:
        prices = await client.get_prices([A, B])
        assert prices[A].value == 0.5 and prices[B].value is None
        assert (await client.get_price(B)).value is None
    assert len(upstream.requests) == 1


async def test_state_priority_goes_first(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    async with running(upstream) as client, trio.open_nursery() as nursery:
        for mint in MINTS[:60]:
            nursery.start_soon(client.get_price, mint)
        await trio.sleep(0.05)
        nursery.start_soon(lambda: client.get_price(MINTS[100], priority=Priority.STATE))
    # Trio starts tasks in no fixed order, so only the sets of USER mints are known.
    assert upstream.ids(0)[0] == MINTS[100]
    assert len(upstream.ids(0)) == 50 and len(upstream.ids(1)) == 11
    assert sorted(upstream.ids(0)[1:] + upstream.ids(1)) == sorted(MINTS[:60])


@pytest.mark.parametrize(
    "reply",
    [
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, json=["not", "an", "object"]),
    ],
)
async def test_malformed_body_fails_callers_then_recovers(
    autojump_clock: trio.testing.MockClock, reply: httpx.Response
) -> None:
    upstream = Jupiter()
    upstream.script = [lambda _: reply]
    async with running(upstream) as client:
        with pytest.raises(UpstreamError, match="malformed"):
            await client.get_price(A)
        assert len(upstream.requests) == 1  # not retried: the same question gets the same answer
        assert (await client.get_price(A)).value == 1.0
        assert client.stats()["errors"] == 1


async def test_bad_entry_fails_only_its_mint(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter(prices={A: "12.5", B: 2.0, C: True})
    async with running(upstream) as client:
        results: dict[str, Any] = {}

        async def get(mint: str) -> None:
            try:
                results[mint] = (await client.get_price(mint)).value
            except UpstreamError as exc:
                results[mint] = exc

        async with trio.open_nursery() as nursery:
            for mint in (A, B, C):
                nursery.start_soon(get, mint)
    assert results[B] == 2.0
    assert isinstance(results[A], UpstreamError) and A in str(results[A])
    assert isinstance(results[C], UpstreamError)
    assert len(upstream.requests) == 1


async def test_429_retry_after_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    upstream.script = [lambda _: httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "slow down"})]
    async with running(upstream, timeout=30.0) as client:  # the pause and the halved rate fit the deadline
        t0 = trio.current_time()
        assert (await client.get_price(A)).value == 1.0
        stats = client.stats()
    assert len(upstream.requests) == 2
    assert upstream.times[1] - upstream.times[0] >= 7.0
    assert trio.current_time() - t0 < 15
    assert stats["retries"] == 1
    assert stats["rate_limiter"]["penalties"] == 1
    assert stats["rate_limiter"]["current_rate"] < 0.5


async def test_5xx_retried_with_backoff_then_error(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    upstream.script = [lambda _: httpx.Response(503)] * 3
    async with running(upstream, api_key=SECRET, max_retries=2) as client:
        with pytest.raises(UpstreamError, match="HTTP 503") as info:
            await client.get_price(A)
        assert len(upstream.requests) == 3
        assert client.stats()["retries"] == 2
    assert SECRET not in str(info.value)


async def test_4xx_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    upstream.script = [lambda _: httpx.Response(401)]
    async with running(upstream) as client:
        with pytest.raises(UpstreamError, match="HTTP 401"):
            await client.get_price(A)
    assert len(upstream.requests) == 1


async def test_secrets_never_in_errors(autojump_clock: trio.testing.MockClock) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url} with key {SECRET}", request=request)

    upstream = Jupiter()
    upstream.script = [refuse] * 3
    path_token = "a" * 32  # QuickNode-style token in the path (redact() masks >= 24 chars)
    secret_url = f"https://price.test/{path_token}/price/v3?api-key={SECRET}"
    async with running(upstream, api_key=SECRET, url=secret_url) as client:
        with pytest.raises(UpstreamUnavailable) as info:
            await client.get_price(A)
        assert SECRET not in json.dumps(client.stats())
        assert path_token not in json.dumps(client.stats())
    assert SECRET not in str(info.value) and path_token not in str(info.value)
    assert "price.test" in str(info.value)
    assert str(upstream.requests[0].url).endswith(f"?api-key={SECRET}&ids={A}")


async def test_timeout_bounds_the_whole_lookup(autojump_clock: trio.testing.MockClock) -> None:
    """The finding: with the API hanging and a 2 s timeout a price took 10 s x 3 attempts."""
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        raise AssertionError("unreachable")

    async with running(hang, timeout=2.0, max_retries=2) as client:  # type: ignore[arg-type]
        t0 = trio.current_time()
        with pytest.raises(UpstreamTimeout, match="price API"):
            await client.get_price(A)
        assert trio.current_time() - t0 == pytest.approx(2.0)  # queueing + attempts + retries: 2 s in all


async def test_stale_price_served_when_api_fails(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    async with running(upstream, max_retries=0) as client:
        await client.get_price(A)
        upstream.script = [lambda _: httpx.Response(502)]
        got = await client.get_price(A, refresh=True)
        assert got.value == 1.0 and got.stale
        assert len(upstream.requests) == 2


async def test_invalid_mint_rejected_before_batching(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    async with running(upstream) as client:
        with pytest.raises(ValueError):
            await client.get_price("not-a-mint")
        with pytest.raises(ValueError):
            await client.get_prices([A, "not-a-mint"])
    assert upstream.requests == []


async def test_cancelled_lookup_is_dropped_from_the_batch(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Jupiter()
    async with running(upstream) as client:
        with trio.move_on_after(0.05):
            await client.get_price(A)
        assert (await client.get_price(B)).value == 2.0
    assert upstream.ids(0) == [B]


async def test_not_running_and_stop_fail_callers(autojump_clock: trio.testing.MockClock) -> None:
    client = PriceClient(PriceConfig(url=URL), Cache(CacheConfig()), transport=httpx.MockTransport(Jupiter()))
    with pytest.raises(UpstreamUnavailable):
        await client.get_price(A)
    caught: list[Exception] = []

    async def get() -> None:
        try:
            await client.get_price(A)
        except UpstreamUnavailable as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        server = trio.CancelScope()

        async def serve() -> None:
            with server:
                await client.run()

        nursery.start_soon(serve)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        server.cancel()
    assert len(caught) == 1 and "stopped" in str(caught[0])


# ---- bounds (issue 10): deadline, queue bound, abandoned lookups, cache quota --------------


def any_price(request: httpx.Request) -> httpx.Response:
    """A price API that prices every mint at 1.0."""
    return httpx.Response(200, json={m: {"usdPrice": 1.0} for m in request.url.params["ids"].split(",")})


class Counting:
    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.ids.append(request.url.params["ids"].split(","))
        return any_price(request)


def _client(upstream: Any, *, cache: Cache | None = None, timeout: float = 30.0, **price: Any) -> PriceClient:
    cfg = PriceConfig(url=URL, **price)
    return PriceClient(cfg, cache or Cache(CacheConfig()), transport=httpx.MockTransport(upstream), timeout=timeout)


async def test_queue_of_distinct_mints_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """The finding: 5,000 abandoned lookups of random mints held up the next user for > 90 s."""
    client = _client(any_price, max_requests_per_second=0.5)  # drains 25 mints/s; default bound 500
    overloaded: list[Overloaded] = []

    async def abandoned(mint: str) -> None:
        try:
            await client.get_price(mint)
        except Overloaded as exc:
            overloaded.append(exc)

    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        for _ in range(5000):
            nursery.start_soon(abandoned, str(Pubkey.new_unique()))
        await trio.testing.wait_all_tasks_blocked()
        assert client.stats()["queued"] == 500 and len(overloaded) == 4500
        # The next user's new mint: an answer at once (503 + Retry-After), not a 200 s wait.
        t0 = trio.current_time()
        mint = str(Pubkey.new_unique())
        with trio.fail_after(31), pytest.raises(Overloaded, match="max_pending_mints") as info:
            await client.get_price(mint)
        assert trio.current_time() == t0
        assert info.value.retry_after == pytest.approx(20.0)  # 500 mints at 50 ids x 0.5 req/s
        await trio.sleep(info.value.retry_after)
        with trio.fail_after(31):
            assert (await client.get_price(mint)).value == 1.0
        assert trio.current_time() - t0 < 21.0
        nursery.cancel_scope.cancel()


async def test_state_lookup_is_let_in_past_the_bound(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Counting()
    client = _client(upstream, max_pending_mints=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        for mint in MINTS[:10]:
            nursery.start_soon(client.get_price, mint)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Overloaded):
            await client.get_price(MINTS[10])
        got = await client.get_price(MINTS[11], priority=Priority.STATE)
        assert got.value == 1.0 and upstream.ids[0][0] == MINTS[11]
        nursery.cancel_scope.cancel()


async def test_full_queue_serves_a_last_good_price(autojump_clock: trio.testing.MockClock) -> None:
    client = _client(any_price, max_pending_mints=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.get_price(A)
        await trio.sleep(60)  # expired, still within cache.max_stale
        for mint in MINTS[10:15]:
            nursery.start_soon(client.get_price, mint)
        await trio.testing.wait_all_tasks_blocked()
        got = await client.get_price(A)
        assert got.value == 1.0 and got.stale
        nursery.cancel_scope.cancel()


async def test_abandoned_lookups_are_dropped_unfetched(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Counting()
    client = _client(upstream, max_pending_mints=10_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        with trio.move_on_after(0.05):  # every caller leaves before the batch window closes
            async with trio.open_nursery() as callers:
                for _ in range(5000):
                    callers.start_soon(client.get_price, str(Pubkey.new_unique()))
        assert client.stats()["queued"] == 0 and client.stats()["dropped"] == 5000
        t0 = trio.current_time()
        assert (await client.get_price(A)).value == 1.0
        assert trio.current_time() - t0 <= 0.1 + 1e-9  # within one batch window: nothing ahead of it
        nursery.cancel_scope.cancel()
    assert upstream.ids == [[A]]


async def test_callers_that_gave_up_are_not_fetched(autojump_clock: trio.testing.MockClock) -> None:
    upstream = Counting()
    client = _client(upstream, timeout=2.0, max_requests_per_second=0.5)
    outcomes: list[str] = []

    async def get(mint: str) -> None:
        try:
            await client.get_price(mint)
            outcomes.append("ok")
        except UpstreamTimeout:
            outcomes.append("timeout")

    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        async with trio.open_nursery() as callers:
            for mint in MINTS[:60]:  # 50 go at t=0.1; the next token comes at t=2.1
                callers.start_soon(get, mint)
        assert trio.current_time() == pytest.approx(2.0)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert sorted(outcomes) == ["ok"] * 50 + ["timeout"] * 10
    assert len(upstream.ids) == 1  # the 10 whose callers gave up were never requested
    assert client.stats()["dropped"] == 10


async def test_hanging_api_serves_the_last_good_price_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    hanging = trio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        if hanging.is_set():
            await trio.sleep(3600)
        return any_price(request)

    client = _client(upstream, timeout=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.get_price(A, priority=Priority.STATE)
        hanging.set()
        t0 = trio.current_time()
        got = await client.get_price(A, priority=Priority.STATE, refresh=True)
        assert got.value == 1.0 and got.stale
        assert trio.current_time() - t0 == pytest.approx(2.0)
        nursery.cancel_scope.cancel()


async def test_user_lookups_cannot_evict_the_state_price(autojump_clock: trio.testing.MockClock) -> None:
    """The finding: a flood of user lookups evicted the state's last-good values (502 in an outage)."""
    failing = trio.Event()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503) if failing.is_set() else any_price(request)

    client = _client(upstream, cache=Cache(CacheConfig(maxsize=100)), max_requests_per_second=1e6)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        await client.get_price(A, priority=Priority.STATE)  # the state's token price
        await client.get_prices([str(Pubkey.new_unique()) for _ in range(300)])  # 3x the quota
        failing.set()
        got = await client.get_price(A, priority=Priority.STATE, refresh=True)
        assert got.value == 1.0 and got.stale  # not UpstreamError: the last-good value survived
        nursery.cancel_scope.cancel()
