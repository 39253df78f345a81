"""Cache: TTL on Trio's clock, LRU bound, single-flight, stale-if-error, stats."""

from __future__ import annotations

import json
import types

import pytest
import trio
import trio.testing

from edgestate.cache import Cache, Cached, cache_key
from edgestate.config import CacheConfig
from edgestate.errors import Overloaded, RateLimited, UpstreamError, UpstreamTimeout


def make(**kw: object) -> Cache:
    if "method_ttls" in kw:
        kw["method_ttls"] = types.MappingProxyType(kw["method_ttls"])  # type: ignore[arg-type]
    return Cache(CacheConfig(**kw))  # type: ignore[arg-type]


class Source:
    """A fetch() that counts calls and can fail or block."""

    def __init__(self, value: object = "v") -> None:
        self.value = value
        self.calls = 0
        self.error: BaseException | None = None
        self.release: trio.Event | None = None

    async def __call__(self) -> object:
        self.calls += 1
        if self.release is not None:
            await self.release.wait()
        else:
            await trio.sleep(0.01)
        if self.error is not None:
            raise self.error
        return self.value


async def test_ttl_expires_exactly_at_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=5.0), Source()
    assert await cache.get_or_fetch("k", src) == Cached("v", 0.0, False)
    t_fetched = trio.current_time()
    await trio.sleep_until(t_fetched + 4.999)
    hit = await cache.get_or_fetch("k", src)
    assert src.calls == 1 and hit.age == pytest.approx(4.999) and not hit.stale
    await trio.sleep_until(t_fetched + 5.0)
    assert trio.current_time() == t_fetched + 5.0
    assert cache.peek("k") is None
    await cache.get_or_fetch("k", src)
    assert src.calls == 2


async def test_per_method_and_explicit_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=5.0, method_ttls={"getSlot": 0.4}), Source()
    await cache.get_or_fetch("slot", src, method="getSlot")
    await cache.get_or_fetch("other", src, method="getBalance")  # not listed: default ttl
    await cache.get_or_fetch("explicit", src, ttl=60.0, method="getSlot")  # ttl wins
    await trio.sleep(0.4)
    assert cache.peek("slot") is None
    assert cache.peek("other") is not None
    await trio.sleep(10)
    assert cache.peek("other") is None
    assert cache.peek("explicit") is not None


async def test_ttl_zero_is_not_cached_but_kept_for_stale(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source()
    await cache.get_or_fetch("k", src, ttl=0)
    await cache.get_or_fetch("k", src, ttl=0)
    assert src.calls == 2
    assert cache.peek("k") is None
    assert cache.peek("k", allow_stale=True) == Cached("v", 0.0, True)


async def test_lru_eviction_at_maxsize(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(maxsize=3), Source()
    for key in "abc":
        await cache.get_or_fetch(key, src)
    await cache.get_or_fetch("a", src)  # a is now most recently used
    await cache.get_or_fetch("d", src)  # evicts b
    assert cache.peek("b") is None
    assert all(cache.peek(k) is not None for k in "acd")
    stats = cache.stats()
    assert stats["size"] == 3 and stats["evictions"] == 1


async def test_expired_entries_are_not_counted_as_evictions(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(maxsize=2, ttl=1.0), Source()
    await cache.get_or_fetch("a", src)
    await cache.get_or_fetch("b", src)
    await trio.sleep(2)
    await cache.get_or_fetch("c", src)
    assert cache.stats()["evictions"] == 0


async def test_thousand_concurrent_misses_one_fetch(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source(value=42)
    results: list[Cached[object]] = []

    async def get() -> None:
        results.append(await cache.get_or_fetch("k", src))

    async with trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(get)
    assert src.calls == 1
    assert len(results) == 1000 and all(r.value == 42 and not r.stale for r in results)
    stats = cache.stats()
    assert (stats["misses"], stats["coalesced"], stats["hits"], stats["inflight"]) == (1, 999, 0, 0)


async def test_error_reaches_every_waiter(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source()
    src.error = UpstreamError("boom")
    caught: list[BaseException] = []

    async def get() -> None:
        try:
            await cache.get_or_fetch("k", src)
        except UpstreamError as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(get)
    assert src.calls == 1
    assert len(caught) == 10 and all(str(e) == "boom" for e in caught)
    assert caught[-1].__cause__ is None and caught[-1].__context__ is None
    assert cache.stats()["errors"] == 1
    # Nothing cached: the next lookup fetches again.
    src.error = None
    assert (await cache.get_or_fetch("k", src)).value == "v"


async def test_bugs_propagate_even_with_a_last_good_value(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=1.0), Source()
    await cache.get_or_fetch("k", src)
    await trio.sleep(2)
    src.error = KeyError("bug")
    with pytest.raises(KeyError):
        await cache.get_or_fetch("k", src)
    src.error = RateLimited("not an upstream failure")
    with pytest.raises(RateLimited):
        await cache.get_or_fetch("k", src)


async def test_cancelled_fetcher_hands_over_to_a_waiter(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source()
    src.release = trio.Event()
    results: list[object] = []

    async def get() -> None:
        results.append((await cache.get_or_fetch("k", src)).value)

    async with trio.open_nursery() as nursery:
        fetcher_scope = trio.CancelScope()

        async def fetcher() -> None:
            with fetcher_scope:
                await get()

        nursery.start_soon(fetcher)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):
            nursery.start_soon(get)
        await trio.testing.wait_all_tasks_blocked()
        assert src.calls == 1
        fetcher_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert src.calls == 2  # one waiter took over, the others wait for it
        src.release.set()
    assert results == ["v", "v", "v"]
    assert cache.stats()["inflight"] == 0


async def test_stale_if_error_within_max_stale(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=5.0, max_stale=60.0), Source()
    await cache.get_or_fetch("k", src)
    await trio.sleep(10)
    src.error = UpstreamTimeout("slow")
    got = await cache.get_or_fetch("k", src)
    assert got.value == "v" and got.stale and got.age == pytest.approx(10.01)
    src.error = Overloaded("full")
    assert (await cache.get_or_fetch("k", src)).stale
    assert cache.stats()["stale_served"] == 2
    await trio.sleep(51)  # now older than max_stale
    with pytest.raises(Overloaded):
        await cache.get_or_fetch("k", src)
    assert cache.stats()["errors"] == 3


async def test_stale_value_is_shared_by_waiters(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=1.0), Source()
    await cache.get_or_fetch("k", src)
    await trio.sleep(2)
    src.error = UpstreamError("down")
    results: list[Cached[object]] = []

    async def get() -> None:
        results.append(await cache.get_or_fetch("k", src))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(get)
    assert src.calls == 2 and len(results) == 5 and all(r.stale for r in results)
    assert cache.stats()["stale_served"] == 5


async def test_invalidate_refetches_but_keeps_last_good(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source()
    await cache.get_or_fetch("k", src)
    cache.invalidate("k")
    cache.invalidate("missing")
    assert cache.peek("k") is None
    src.error = UpstreamError("down")
    assert (await cache.get_or_fetch("k", src)).stale


async def test_none_is_a_cached_value(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(), Source(value=None)
    await cache.get_or_fetch("k", src)
    assert await cache.get_or_fetch("k", src) == Cached(None, 0.0, False)
    assert src.calls == 1


async def test_stats_counters_and_json(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(maxsize=10), Source()
    await cache.get_or_fetch("a", src)
    await cache.get_or_fetch("a", src)
    await cache.get_or_fetch("a", src)
    await cache.get_or_fetch("b", src)
    stats = cache.stats()
    assert stats["hits"] == 2 and stats["misses"] == 2
    assert stats["hit_rate"] == 0.5
    assert stats["size"] == 2 and stats["maxsize"] == 10
    json.dumps(stats)
    before = cache.stats()
    cache.peek("a")
    assert cache.stats() == before


def test_cache_key_is_canonical() -> None:
    a = cache_key("getAccountInfo", ["X", {"encoding": "base64", "commitment": "confirmed"}])
    b = cache_key("getAccountInfo", ["X", {"commitment": "confirmed", "encoding": "base64"}])
    assert a == b
    assert " " not in a
    assert cache_key("m", [1], "confirmed") != cache_key("m", [1], "finalized")
    assert cache_key("m", [1]) != cache_key("n", [1])


# ---- partitions (issue 10): user lookups have a quota of their own --------------------------

STATE_PRICE = cache_key("price", "TokenMint1111111111111111111111111111111111")


async def test_balance_flood_cannot_evict_the_state_last_good(autojump_clock: trio.testing.MockClock) -> None:
    """The finding: 101 lookups of 1,000 wallets filled the last-good store; the state got 502."""
    cache = make(maxsize=10_000, ttl=5.0)  # scaled down 10x from the default 100,000
    assert (await cache.get_or_fetch(STATE_PRICE, Source(0.042), shared=True)).value == 0.042
    for request in range(11):
        for wallet in range(1000):
            cache.put(cache_key("tokenBalance", [f"{request}/{wallet}"]), 1, method="tokenBalance")
    await trio.sleep(10)  # everything fresh has expired; an outage starts
    down = Source()
    down.error = UpstreamError("price API down")
    got = await cache.get_or_fetch(STATE_PRICE, down, shared=True)
    assert got.value == 0.042 and got.stale
    parts = cache.stats()["partitions"]
    assert parts["user"]["last_good"] == 10_000 and parts["state"]["last_good"] == 1


async def test_user_refresh_of_a_state_key_stays_protected(autojump_clock: trio.testing.MockClock) -> None:
    cache = make(maxsize=10, ttl=1.0)
    await cache.get_or_fetch(STATE_PRICE, Source("a"), shared=True)
    await trio.sleep(2)
    assert (await cache.get_or_fetch(STATE_PRICE, Source("b"))).value == "b"  # a user lookup refreshes it
    for i in range(100):
        await cache.get_or_fetch(f"user{i}", Source(i))
    await trio.sleep(2)
    down = Source()
    down.error = UpstreamTimeout("slow")
    got = await cache.get_or_fetch(STATE_PRICE, down)
    assert got.value == "b" and got.stale
    assert cache.peek("user99", allow_stale=True) is not None and cache.peek("user0", allow_stale=True) is None


async def test_state_partition_has_its_own_bound(autojump_clock: trio.testing.MockClock) -> None:
    cache = make(maxsize=10, state_maxsize=3)
    for i in range(5):
        cache.put(f"s{i}", i, shared=True)
    for i in range(5):
        cache.put(f"u{i}", i)
    stats = cache.stats()
    assert stats["partitions"]["state"] == {"size": 3, "maxsize": 3, "last_good": 3, "evictions": 2}
    assert stats["partitions"]["user"]["size"] == 5 and stats["size"] == 8
    assert cache.get("s4") is not None and cache.get("s0") is None and cache.get("u0") is not None


async def test_a_key_moves_to_the_state_partition_once_shared(autojump_clock: trio.testing.MockClock) -> None:
    cache = make(maxsize=2)
    cache.put("k", 1)
    cache.put("k", 2, shared=True)
    parts = cache.stats()["partitions"]
    assert (parts["user"]["last_good"], parts["state"]["last_good"]) == (0, 1)
    cache.invalidate("k")
    assert cache.peek("k") is None and cache.peek("k", allow_stale=True) == Cached(2, 0.0, True)


async def test_would_fetch_tells_what_a_lookup_would_cost(autojump_clock: trio.testing.MockClock) -> None:
    cache, src = make(ttl=1.0), Source()
    src.release = trio.Event()
    assert cache.would_fetch("k")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get_or_fetch, "k", src)
        await trio.testing.wait_all_tasks_blocked()
        assert not cache.would_fetch("k")  # in flight: a lookup now would share it
        src.release.set()
    assert not cache.would_fetch("k")  # fresh
    await trio.sleep(1.0)
    assert cache.would_fetch("k")  # expired (a last-good value does not count)
