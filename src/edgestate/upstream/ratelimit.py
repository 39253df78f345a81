"""Token bucket with priorities, 429 back-off and an observed-rate meter.

One :class:`RateLimiter` guards one upstream budget (the RPC provider, the price API,
or one client address). Waiters are served strictly by :class:`Priority`, FIFO within
a priority. Only the head of the queue ever sleeps on the clock; everyone else sleeps
on their own event until they become head, so there are no busy loops and no herd.

Choices callers can rely on:

* ``burst`` (default ``max(1, rate)``: one second's worth) is the bucket size and the
  number of tokens it starts with.
* A ``cost`` above ``burst`` is granted once the bucket is full, and the bucket goes
  negative by the difference: the debt is repaid before anyone else is served, so the
  long-run rate still holds.
* :meth:`RateLimiter.penalize` (the upstream answered 429) empties the bucket, hands
  out nothing until ``retry_after`` has passed and halves the effective rate (floor:
  10% of the configured rate). The rate then recovers linearly by 10% of the configured
  rate per 10 s. Several 429s during one pause (requests already in flight) halve it
  only once.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

_FLOOR = 0.1  # the effective rate never drops below 10% of the configured one
_RECOVERY_PER_S = 0.01  # +10% of the configured rate per 10 s without a new 429
_WINDOW = 10  # seconds over which observed_rate() averages
_EPS = 1e-9  # float slack when comparing tokens with a cost


class Priority(enum.IntEnum):
    """Who goes first when the bucket is empty (lower value = served first)."""

    STATE = 0  # shared-state refresh: served first
    USER = 1  # user lookups (prices, balances)


class _Waiter:
    __slots__ = ("priority", "seq", "cost", "wakeup", "queued")

    def __init__(self, priority: int, seq: int, cost: float) -> None:
        self.priority = priority
        self.seq = seq
        self.cost = cost
        self.wakeup = trio.Event()
        self.queued = True  # False once granted or abandoned (lazy heap deletion)

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class RateLimiter:
    """A token bucket refilled continuously at ``rate`` tokens/s, up to ``burst``.

    Args:
        rate: tokens per second (the upstream's request budget).
        burst: bucket size; default ``max(1, rate)``.
        name: shown in stats and repr.
    """

    def __init__(self, rate: float, *, burst: float | None = None, name: str = "") -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.name = name
        self._rate = float(rate)
        self._burst = float(burst) if burst is not None else max(1.0, self._rate)
        if not self._burst > 0:
            raise ValueError(f"burst must be > 0, got {burst!r}")
        self._eff = self._rate
        self._tokens = self._burst
        self._last: float | None = None  # time of the last refill; None until first use
        self._paused_until = -math.inf
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()
        self._queued = {p: 0 for p in Priority}
        self._granted = 0
        self._granted_cost = 0.0
        self._rejected = 0
        self._penalties = 0
        self._meter: deque[list[float]] = deque(maxlen=_WINDOW + 1)  # [second, cost]

    def __repr__(self) -> str:
        return (
            f"<RateLimiter {self.name!r} rate={self._eff:g}/{self._rate:g} burst={self._burst:g} "
            f"queued={len(self._heap)}>"
        )

    # -- sync state changes ---------------------------------------------------------

    def _ramp(self, dt: float, accrue: bool) -> None:
        """Advance the effective rate (and, if ``accrue``, the tokens) by ``dt`` s."""
        slope = self._rate * _RECOVERY_PER_S
        eff0 = self._eff
        t_ramp = min(dt, (self._rate - eff0) / slope) if eff0 < self._rate else 0.0
        self._eff = self._rate if t_ramp < dt else eff0 + slope * t_ramp
        if accrue:
            added = eff0 * t_ramp + 0.5 * slope * t_ramp * t_ramp + self._rate * (dt - t_ramp)
            self._tokens = min(self._burst, self._tokens + added)

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
        if now <= self._last:
            return
        start = min(max(self._last, self._paused_until), now)
        self._ramp(start - self._last, accrue=False)  # no tokens accrue while paused
        self._ramp(now - start, accrue=True)
        self._last = now

    def _wait_time(self, need: float, now: float) -> float:
        """Seconds from ``now`` until ``need`` more tokens have accrued."""
        pause = max(0.0, self._paused_until - now)
        if need <= 0:
            return pause
        slope = self._rate * _RECOVERY_PER_S
        eff0 = self._eff
        if eff0 >= self._rate:
            return pause + need / self._rate
        # NB: the ramp keeps running during the pause, so start from the rate after it.
        eff0 = min(self._rate, eff0 + slope * pause)
        t_ramp = (self._rate - eff0) / slope
        ramp_tokens = eff0 * t_ramp + 0.5 * slope * t_ramp * t_ramp
        if need <= ramp_tokens:
            return pause + (math.sqrt(eff0 * eff0 + 2 * slope * need) - eff0) / slope
        return pause + t_ramp + (need - ramp_tokens) / self._rate

    def _need(self, cost: float) -> float:
        # A cost above burst waits for a full bucket and then goes negative.
        return min(cost, self._burst) - self._tokens

    def _take(self, cost: float, now: float) -> None:
        self._tokens -= cost
        self._granted += 1
        self._granted_cost += cost
        second = math.floor(now)
        if self._meter and self._meter[-1][0] == second:
            self._meter[-1][1] += cost
        else:
            self._meter.append([second, cost])

    def _head(self) -> _Waiter | None:
        while self._heap and not self._heap[0].queued:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def _unqueue(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue and hand the head role on."""
        waiter.queued = False
        self._queued[Priority(waiter.priority)] -= 1
        head = self._head()
        if head is not None:
            head.wakeup.set()

    def _try_grant(self, waiter: _Waiter, now: float) -> float:
        """Grant ``waiter`` if it is head and tokens suffice; return 0, else seconds to sleep."""
        if self._head() is not waiter:
            return math.inf  # sleep until the previous head hands over
        self._refill(now)
        if now < self._paused_until or self._need(waiter.cost) > _EPS:
            return max(self._wait_time(self._need(waiter.cost), now), _EPS)
        self._take(waiter.cost, now)
        self._unqueue(waiter)
        return 0.0

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens now if nobody is queued and they are there.

        Returns:
            True when granted; False (counted as ``rejected``) otherwise.
        """
        now = trio.current_time()
        self._refill(now)
        if self._head() is None and now >= self._paused_until and self._need(cost) <= _EPS:
            self._take(cost, now)
            return True
        self._rejected += 1
        return False

    def penalize(self, retry_after: float | None = None) -> None:
        """The upstream answered 429: pause, then continue at a lower rate.

        Args:
            retry_after: seconds to hand out nothing (the upstream's Retry-After);
                ``None`` means 1 s.
        """
        now = trio.current_time()
        self._refill(now)
        pause = 1.0 if retry_after is None or not retry_after >= 0 else float(retry_after)
        if now >= self._paused_until:  # a new episode, not one more reply from the same burst
            self._eff = max(self._rate * _FLOOR, self._eff / 2)
        self._penalties += 1
        self._paused_until = max(self._paused_until, now + pause)
        self._tokens = min(self._tokens, 0.0)
        head = self._head()
        if head is not None:
            head.wakeup.set()  # its deadline moved

    # -- async API ------------------------------------------------------------------

    async def acquire(self, cost: float = 1.0, *, priority: Priority = Priority.USER) -> None:
        """Wait until ``cost`` tokens are granted to this caller.

        Higher priorities (lower values) go first; FIFO within a priority. A caller
        cancelled while waiting leaves the queue and consumes nothing.
        """
        if not cost >= 0:
            raise ValueError(f"cost must be >= 0, got {cost!r}")
        await trio.lowlevel.checkpoint_if_cancelled()
        waiter = _Waiter(int(priority), next(self._seq), float(cost))
        heapq.heappush(self._heap, waiter)
        self._queued[Priority(priority)] += 1
        try:
            while (wait := self._try_grant(waiter, trio.current_time())) > 0:
                with trio.move_on_after(wait):
                    await waiter.wakeup.wait()
                waiter.wakeup = trio.Event()
        except BaseException:
            if waiter.queued:
                self._unqueue(waiter)
            raise
        # Granted without sleeping: still yield once, as every trio async call should.
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def execute(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        priority: Priority = Priority.USER,
        cost: float = 1.0,
    ) -> T:
        """``await fn(*args)`` once ``cost`` tokens are granted (the seed's API)."""
        await self.acquire(cost, priority=priority)
        return await fn(*args)

    # -- observability --------------------------------------------------------------

    def observed_rate(self) -> float:
        """Cost granted per second, averaged over the last 10 s."""
        now = trio.current_time()
        since = math.floor(now) - _WINDOW  # the current (partial) second plus 9 full ones
        return sum(cost for second, cost in self._meter if second > since) / _WINDOW

    def stats(self) -> dict[str, Any]:
        """A JSON-serializable snapshot of the limiter."""
        now = trio.current_time()
        self._refill(now)
        asked = self._granted + self._rejected
        return {
            "name": self.name,
            "limit": self._rate,
            "burst": self._burst,
            "current_rate": round(self._eff, 6),
            "tokens": round(self._tokens, 6) + 0.0,  # no "-0.0"
            "queued": {p.name.lower(): n for p, n in self._queued.items()},
            "granted": self._granted,
            "granted_cost": self._granted_cost,
            "rejected": self._rejected,
            "rejection_rate": self._rejected / asked if asked else 0.0,
            "penalties": self._penalties,
            "paused_for": max(0.0, self._paused_until - now),
            "observed_rate": self.observed_rate(),
        }
