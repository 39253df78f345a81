"""Keeps the shared state fresh with a few upstream calls per second.

    refresher.run
    ├── price loop          token.mint price every state.price_interval
    ├── participants loop   getProgramAccounts count every state.participants_interval
    ├── jackpot PubSub      accountSubscribe(pot): pushed the moment it changes
    ├── jackpot fallback    polls every state.polling_interval while PubSub is down
    ├── staleness watch     republishes when the snapshot's ``stale`` flag flips
    └── budget watch        upstream.credits_per_month: stretches the intervals above

Every read goes through the gateway at ``Priority.STATE``, ahead of user lookups.

Quota budget: with ``upstream.credits_per_month`` set, the projected monthly burn (the
credits the limiter granted over the last minute, as a rate x 30 days) is compared with
the budget every 5 s, and the three polling intervals are multiplied by
:func:`interval_scale` (at most ``upstream.max_interval_scale``). After a change the
rate is measured afresh for 30 s before the next decision, so the controller does not
chase its own transient. Children never call the providers, so a root's projection is
its whole tree's.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .config import Config
from .errors import EdgeStateError
from .state import SharedState
from .upstream.prices import PriceClient
from .upstream.pubsub import AccountSubscription
from .upstream.ratelimit import Priority, RateLimiter
from .upstream.rpc import SolanaRpc

log = logging.getLogger("edgestate.refresh")

SECONDS_PER_MONTH = 30 * 86400
_BUDGET_EVERY = 5.0  # seconds between budget checks
_BUDGET_WINDOW = 60.0  # seconds of granted credits a projection is based on
_BUDGET_SETTLE = 30.0  # seconds measured at one scale before deciding on another


def interval_scale(projected: float, budget: float, *, current: float = 1.0, max_scale: float = 10.0) -> float:
    """The factor to apply to the polling intervals to keep ``projected`` within ``budget``.

    ``projected`` is the monthly burn observed while the intervals were ``current`` times
    the configured ones. Polling dominates a root's provider traffic, so its cost is taken
    as inversely proportional to the factor: the burn at factor 1 would be
    ``projected * current``, and the factor that fits the budget is that over ``budget``.
    The result lies in ``[1, max_scale]``; ``budget <= 0`` (no budget) gives 1.

    >>> interval_scale(2_000_000, 1_000_000)
    2.0
    >>> interval_scale(500_000, 1_000_000, current=4.0)
    2.0
    """
    if budget <= 0 or not math.isfinite(projected) or projected <= 0:
        return 1.0
    return min(max_scale, max(1.0, projected * current / budget))


class Refresher:
    """The tasks that feed :class:`SharedState` from upstream."""

    def __init__(
        self,
        cfg: Config,
        state: SharedState,
        rpc: SolanaRpc,
        prices: PriceClient,
        *,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._cfg = cfg
        self._limiter = limiter
        self.scale = 1.0  # the budget's factor on the polling intervals
        self.projected: float | None = None  # credits/month over the last window (budget only)
        self._rescaled = trio.Event()
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._state = state
        self._rpc = rpc
        self._prices = prices
        self._push_changed = trio.Event()
        self._read_now = trio.Event()
        self._failing: set[str] = set()
        self.polls = {"tokenPrice": 0, "jackpot": 0, "participants": 0}
        self.errors = {"tokenPrice": 0, "jackpot": 0, "participants": 0}
        self.pubsub = AccountSubscription(
            cfg.upstream.pubsub_url,
            cfg.lottery.pot_account,
            commitment=cfg.upstream.commitment,
            on_change=self._on_push,
            on_state=self._on_pubsub_state,
            ping_interval=cfg.ws.ping_interval,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        st = self._cfg.state
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._every, st.price_interval, "tokenPrice", self._read_price)
            nursery.start_soon(self._every, st.participants_interval, "participants", self._read_participants)
            nursery.start_soon(self._jackpot_fallback)
            nursery.start_soon(self.pubsub.run)
            nursery.start_soon(self._watch_staleness)
            if self._cfg.upstream.credits_per_month > 0 and self._limiter is not None:
                nursery.start_soon(self._watch_budget, self._limiter)
            task_status.started()

    # -- the readers ----------------------------------------------------------------

    async def _read_price(self) -> None:
        cached = await self._prices.get_price(self._cfg.token.mint, priority=Priority.STATE, refresh=True)
        if not cached.stale:
            self._state.update("tokenPrice", cached.value, source="poll")

    async def _read_participants(self) -> None:
        lottery = self._cfg.lottery
        result = await self._rpc.count_program_accounts(
            lottery.program_id, lottery.participant_filters, priority=Priority.STATE, cached=False
        )
        if not result.stale:
            self._state.update("participants", result.value, slot=result.slot, source="poll")

    async def _read_jackpot(self) -> None:
        result = await self._rpc.get_balance(self._cfg.lottery.pot_account, priority=Priority.STATE, cached=False)
        self._state.update("jackpot", result.value, slot=result.slot, source="poll")

    async def _attempt(self, name: str, read: Callable[[], Awaitable[None]]) -> None:
        """One read; failures are logged once per outage, never raised."""
        self.polls[name] += 1
        try:
            await read()
        except (EdgeStateError, ValueError) as exc:
            self.errors[name] += 1
            if name not in self._failing:
                self._failing.add(name)
                log.warning("refreshing %s failed: %s: %s (serving the last value)", name, type(exc).__name__, exc)
            return
        if name in self._failing:
            self._failing.discard(name)
            log.info("refreshing %s works again", name)

    async def _every(self, interval: float, name: str, read: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self._attempt(name, read)
            await self._sleep_scaled(interval)

    async def _sleep_scaled(self, interval: float) -> None:
        """Sleep ``interval x scale``; a change of scale re-plans from the same start."""
        start = trio.current_time()
        while True:
            rescaled = self._rescaled
            with trio.move_on_at(start + interval * self.scale):
                await rescaled.wait()
                continue
            return

    # -- the jackpot: push first, polling while push is down --------------------------

    def _on_push(self, lamports: int, slot: int) -> None:
        self._state.update("jackpot", lamports, slot=slot, source="push")

    def _on_pubsub_state(self, up: bool) -> None:
        # On every (re)subscribe read once: a change while we were away is not lost.
        self._push_changed.set()
        if up:
            self._read_now.set()

    async def _jackpot_fallback(self) -> None:
        interval = self._cfg.state.polling_interval
        while True:
            self._push_changed = trio.Event()
            read_now, self._read_now = self._read_now.is_set(), trio.Event()
            if read_now or not self.pubsub.up:
                await self._attempt("jackpot", self._read_jackpot)
            if self.pubsub.up:
                await self._push_changed.wait()
            else:
                with trio.move_on_after(interval * self.scale):
                    await self._push_changed.wait()

    def budget_tick(self, now: float, granted_credits: float) -> bool:
        """Record the limiter's cumulative granted credits; rescale if due. True if rescaled."""
        samples = self._samples
        samples.append((now, granted_credits))
        while len(samples) > 2 and now - samples[1][0] >= _BUDGET_WINDOW:
            samples.popleft()
        t0, c0 = samples[0]
        if now - t0 <= 0:
            return False
        self.projected = (granted_credits - c0) / (now - t0) * SECONDS_PER_MONTH
        if now - t0 < _BUDGET_SETTLE:
            return False
        up = self._cfg.upstream
        scale = interval_scale(self.projected, up.credits_per_month, current=self.scale, max_scale=up.max_interval_scale)
        if abs(scale - self.scale) < 0.05 * self.scale:
            return False  # not worth re-planning for
        log.log(
            logging.WARNING if scale > self.scale else logging.INFO,
            "credit budget %g/month, projected %.0f/month: polling intervals x%.2f (were x%.2f)",
            up.credits_per_month, self.projected, scale, self.scale,
        )
        self.scale = scale
        samples.clear()
        samples.append((now, granted_credits))  # measure afresh at the new scale
        rescaled, self._rescaled = self._rescaled, trio.Event()
        rescaled.set()
        return True

    async def _watch_budget(self, limiter: RateLimiter) -> None:
        while True:
            self.budget_tick(trio.current_time(), float(limiter.stats()["granted_cost"]))
            await trio.sleep(_BUDGET_EVERY)

    def budget_stats(self) -> dict[str, Any]:
        """The ``budget`` figures of /stats (``upstream.credits_per_month`` and what it does)."""
        budget = self._cfg.upstream.credits_per_month
        projected = self.projected
        if projected is None and self._limiter is not None:
            projected = self._limiter.observed_rate() * SECONDS_PER_MONTH
        return {
            "credits_per_month": budget,
            "projected_monthly_credits": None if projected is None else round(projected),
            "over_budget": bool(budget > 0 and projected is not None and projected > budget),
            "interval_scale": round(self.scale, 3),
            "max_interval_scale": self._cfg.upstream.max_interval_scale,
        }

    async def _watch_staleness(self) -> None:
        while True:
            await trio.sleep(1.0)
            self._state.refresh_staleness()

    def stats(self) -> dict[str, Any]:
        return {
            "polls": dict(self.polls),
            "errors": dict(self.errors),
            "failing": sorted(self._failing),
            "jackpot_source": "push" if self.pubsub.up else "poll",
            "interval_scale": round(self.scale, 3),
            "pubsub": self.pubsub.stats(),
        }
