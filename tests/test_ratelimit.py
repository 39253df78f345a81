"""RateLimiter: pacing, priorities, cancellation, 429 penalty, stats (virtual time)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from edgestate.upstream.ratelimit import Priority, RateLimiter


async def test_thousand_acquires_at_100_per_s_take_9_to_10_s(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(100)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(limiter.acquire)
    elapsed = trio.current_time() - t0
    assert 9.0 <= elapsed <= 10.01
    stats = limiter.stats()
    assert stats["granted"] == 1000
    assert stats["queued"] == {"state": 0, "user": 0}


async def test_burst_is_granted_at_once_then_paced(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=5)
    t0 = trio.current_time()
    for _ in range(5):
        await limiter.acquire()
    assert trio.current_time() == t0
    await limiter.acquire()
    assert trio.current_time() - t0 == pytest.approx(0.1)
    await limiter.acquire(cost=2)
    assert trio.current_time() - t0 == pytest.approx(0.3)


async def test_default_burst_is_one_second_or_one_token() -> None:
    assert RateLimiter(100).stats()["burst"] == 100
    assert RateLimiter(0.5).stats()["burst"] == 1


async def _contend(limiter: RateLimiter, entries: list[tuple[str, Priority, float]]) -> list[str]:
    """Queue ``entries`` in order behind an empty bucket; return the grant order."""
    order: list[str] = []

    async def take(label: str, priority: Priority, cost: float) -> None:
        await limiter.acquire(cost, priority=priority)
        order.append(label)

    await limiter.acquire(limiter.stats()["burst"])  # empty the bucket
    async with trio.open_nursery() as nursery:
        for label, priority, cost in entries:
            nursery.start_soon(take, label, priority, cost)
            await trio.testing.wait_all_tasks_blocked()
    return order


async def test_higher_priority_overtakes_earlier_lower(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=1)
    order = await _contend(
        limiter,
        [("u1", Priority.USER, 1), ("u2", Priority.USER, 1), ("s1", Priority.STATE, 1), ("s2", Priority.STATE, 1)],
    )
    assert order == ["s1", "s2", "u1", "u2"]


async def test_fifo_within_priority_and_no_small_cost_overtaking(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=5)
    order = await _contend(
        limiter,
        [("big", Priority.USER, 5), ("small", Priority.USER, 0.1), ("s-big", Priority.STATE, 3), ("s", Priority.STATE, 1)],
    )
    assert order == ["s-big", "s", "big", "small"]


async def test_cost_above_burst_is_served_and_repaid(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=2)
    t0 = trio.current_time()
    await limiter.acquire(cost=12)  # bucket full: granted, 10 tokens in debt
    assert trio.current_time() == t0
    assert limiter.stats()["tokens"] == pytest.approx(-10)
    await limiter.acquire()
    assert trio.current_time() - t0 == pytest.approx(1.1)


async def test_cancelled_waiter_leaves_queue_cleanly(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, burst=1)
    await limiter.acquire()
    granted: list[str] = []

    async def take(label: str, priority: Priority) -> None:
        await limiter.acquire(priority=priority)
        granted.append(label)

    async with trio.open_nursery() as nursery:
        head_scope = trio.CancelScope()
        nursery.start_soon(_in_scope, head_scope, take("head", Priority.STATE))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "next", Priority.USER)
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.stats()["queued"] == {"state": 1, "user": 1}
        t0 = trio.current_time()
        head_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert limiter.stats()["queued"] == {"state": 0, "user": 1}
    assert granted == ["next"]
    assert trio.current_time() - t0 == pytest.approx(1.0)  # no token lost to the cancelled one
    assert limiter.stats()["granted"] == 2


async def _in_scope(scope: trio.CancelScope, coro: object) -> None:
    with scope:
        await coro  # type: ignore[misc]


async def test_cancel_before_acquire_takes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, burst=1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await limiter.acquire()
    assert limiter.stats()["granted"] == 0
    assert limiter.try_acquire()


async def test_penalize_pauses_halves_and_recovers(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=1)
    t0 = trio.current_time()
    limiter.penalize(retry_after=3)
    stats = limiter.stats()
    assert stats["current_rate"] == 5.0
    assert stats["paused_for"] == 3.0
    assert stats["penalties"] == 1
    limiter.penalize(retry_after=2)  # same episode (still paused): no second halving
    assert limiter.stats()["current_rate"] == 5.0
    await limiter.acquire()
    # Nothing during the pause; then one token at ~5/s (ramping up): a bit under 0.2 s.
    assert 3.15 < trio.current_time() - t0 < 3.2
    # Recovery: +1/s per 10 s (10% of 10/s per 10 s) back to 10/s after 50 s.
    await trio.sleep(20 - (trio.current_time() - t0))
    assert limiter.stats()["current_rate"] == pytest.approx(7.0)
    await trio.sleep(40)
    assert limiter.stats()["current_rate"] == 10.0


async def test_penalize_floor_and_default_pause(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10)
    for _ in range(6):
        limiter.penalize()
        assert limiter.stats()["paused_for"] == 1.0
        await trio.sleep(1)
    # 5 -> 2.55 -> 1.325 -> then the floor (1/s), each time +0.1 after a second of recovery.
    assert limiter.stats()["current_rate"] == pytest.approx(1.1)


async def test_penalize_wakes_head_and_delays_it(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, burst=1)
    await limiter.acquire()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.acquire)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.5)
        limiter.penalize(retry_after=5)
    # The half token is dropped; paused until 5.5, then one token at ~0.55/s: ~1.8 s.
    assert 7.28 < trio.current_time() - t0 < 7.3


async def test_execute_wraps_a_call(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(2, burst=1)

    async def double(x: int) -> int:
        return 2 * x

    t0 = trio.current_time()
    assert await limiter.execute(double, 21, priority=Priority.STATE) == 42
    assert await limiter.execute(double, 1, cost=1) == 2
    assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_try_acquire_and_rejection_stats(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1, burst=2, name="client")
    assert limiter.try_acquire()
    assert limiter.try_acquire()
    assert not limiter.try_acquire()
    stats = limiter.stats()
    assert (stats["granted"], stats["rejected"]) == (2, 1)
    assert stats["rejection_rate"] == pytest.approx(1 / 3)
    await trio.sleep(1)
    assert limiter.try_acquire()


async def test_try_acquire_does_not_jump_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=5)
    await limiter.acquire(5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.acquire, 5.0)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.2)  # 2 tokens are there, but they are the queued waiter's
        assert not limiter.try_acquire()
    assert limiter.stats()["rejected"] == 1


async def test_observed_rate_and_stats_are_json(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(100)
    async with trio.open_nursery() as nursery:
        for _ in range(600):
            nursery.start_soon(limiter.acquire)
    # 600 granted in the last ~5 s -> 60/s over the 10 s window.
    assert limiter.observed_rate() == pytest.approx(60.0)
    json.dumps(limiter.stats())
    await trio.sleep(11)
    assert limiter.observed_rate() == 0.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(1, burst=0)
