"""Keeps the shared state fresh with a few upstream calls per second.

    refresher.run
    ├── price loop          token.mint price every state.price_interval
    ├── PubSub              one connection: accountSubscribe(pot) and
    │                       programSubscribe(lottery program, participant filters)
    ├── participants loop   PubSub up: a full recount (getProgramAccounts, addresses only)
    │                       at every (re)subscribe and every participants_reconcile_interval;
    │                       PubSub down: the same every state.participants_interval
    ├── jackpot fallback    read at every (re)subscribe; polled every state.polling_interval
    │                       while PubSub is down
    ├── staleness watch     republishes when the snapshot's ``stale`` flag flips
    └── budget watch        upstream.credits_per_month: stretches the RPC intervals above

Every read goes through the gateway at ``Priority.STATE``, ahead of user lookups.

Participants are pushed: the count is the size of the set of participant addresses, taken
from the last recount plus what programSubscribe notified since (closed accounts are not
notified, hence the periodic recount). A pushed value is as fresh as its subscription:
every answered ping of the PubSub socket confirms the pushed fields, so a pot that does
not change for an hour stays ready.

Quota budget: with ``upstream.credits_per_month`` set, the projected monthly burn (the
credits the pool sent over the last 15 minutes, as a rate x 30 days) is compared with
the budget every 5 s, and the RPC polling intervals are multiplied by :func:`interval_scale`
(at most ``upstream.max_interval_scale``). The price interval is never stretched: the
price API costs no RPC credits (its own limit is the price client's rate limiter). After
a change the rate is measured afresh for 5 minutes before the next decision, so the
controller does not chase its own transient. Children never call the providers, so a
root's projection is its whole tree's.
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
from .upstream.costs import SECONDS_PER_MONTH
from .upstream.prices import PriceClient
from .upstream.pubsub import AccountWatch, ProgramWatch, PubSub
from .upstream.ratelimit import Priority, RateLimiter
from .upstream.rpc import SolanaRpc

log = logging.getLogger("edgestate.refresh")

__all__ = ["SECONDS_PER_MONTH", "Participants", "Refresher", "interval_scale"]
_MAX_RECENT = 100_000  # pushes remembered between two recounts; beyond, the next recount comes early
_BUDGET_EVERY = 5.0  # seconds between budget checks
# Seconds of spent credits a projection is based on, and measured at one scale before a
# decision. Long: a recount every 10 minutes and the reads at (re)subscribe are lumps
# that a one-minute window would project to millions a month.
BUDGET_WINDOW = 900.0
BUDGET_SETTLE = 300.0


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


class Participants:
    """The participant addresses: the last full recount plus what was pushed since.

    Pure sync state. A recount's answer holds every push made before its request was
    sent; pushes after that are applied on top when they are newer than the recount's
    slot (or, when the provider gave no slot, when they arrived after the request).
    """

    def __init__(self) -> None:
        self.keys: set[str] | None = None  # None until the first recount
        self.slot = 0
        self.pushes = 0
        self.recounts = 0
        self.overflowed = False  # too many pushes between two recounts: recount early
        self._seq = 0
        self._recent: dict[str, tuple[int, int, bool]] = {}  # pubkey -> (seq, slot, alive)

    @property
    def count(self) -> int | None:
        return None if self.keys is None else len(self.keys)

    def recount_started(self) -> int:
        """Mark the moment a recount request goes out; pass the token to :meth:`recounted`."""
        return self._seq

    def pushed(self, pubkey: str, lamports: int, slot: int) -> bool:
        """A programSubscribe notification; True when the count changed."""
        self.pushes += 1
        self._seq += 1
        alive = lamports > 0  # a closed account (0 lamports) is no participant any more
        if len(self._recent) >= _MAX_RECENT and pubkey not in self._recent:
            self.overflowed = True
        else:
            self._recent[pubkey] = (self._seq, slot, alive)
        self.slot = max(self.slot, slot)
        if self.keys is None:
            return False
        before = len(self.keys)
        if alive:
            self.keys.add(pubkey)
        else:
            self.keys.discard(pubkey)
        return len(self.keys) != before

    def recounted(self, keys: frozenset[str], slot: int, token: int) -> None:
        """A full recount's answer, read at ``slot``, requested at ``token``."""
        self.recounts += 1
        base = set(keys)
        newer = {
            k: v for k, v in self._recent.items() if (v[1] > slot if slot else v[0] > token)
        }
        for key, (_, _, alive) in newer.items():
            if alive:
                base.add(key)
            else:
                base.discard(key)
        self._recent = newer
        self.keys = base
        self.slot = max(self.slot, slot, *(v[1] for v in newer.values()))
        self.overflowed = False


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
        credits: Callable[[], float] | None = None,
        push_participants: bool = True,
    ) -> None:
        """Args:
            limiter: the pool's request limiter (for /stats).
            credits: credits spent so far (cumulative), for the budget; default the
                pool's credit meter, when ``rpc`` has a pool.
            push_participants: programSubscribe the participants (False: poll them every
                ``state.participants_interval`` even with PubSub up, the design before
                issue 11; for the cost benchmark's comparison).
        """
        self._cfg = cfg
        self._limiter = limiter
        pool = getattr(rpc, "pool", None)
        self._credits = credits if credits is not None else (pool.credits.total if pool is not None else None)
        self.scale = 1.0  # the budget's factor on the polling intervals
        self.projected: float | None = None  # credits/month over the last window (budget only)
        self._rescaled = trio.Event()
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._state = state
        self._rpc = rpc
        self._prices = prices
        self._push_changed = trio.Event()
        self._read_now = trio.Event()
        self._participants_wakeup = trio.Event()
        self._failing: set[str] = set()
        self._warned: set[str] = set()
        # Read since the latest (re)subscribe: the subscription keeps these values current.
        self._synced: set[str] = set()
        self.participants = Participants()
        self.push_participants = push_participants
        self.polls = {"tokenPrice": 0, "jackpot": 0, "participants": 0}
        self.errors = {"tokenPrice": 0, "jackpot": 0, "participants": 0}
        lottery = cfg.lottery
        watches: list[AccountWatch | ProgramWatch] = [AccountWatch(lottery.pot_account, self._on_push, name="pot")]
        if push_participants:
            watches.append(ProgramWatch(lottery.program_id, lottery.participant_filters, self._on_participant,
                                        name="participants"))
        self.pubsub = PubSub(
            cfg.upstream.pubsub_url,
            watches,
            commitment=cfg.upstream.commitment,
            on_state=self._on_pubsub_state,
            on_alive=self._on_alive,
            ping_interval=cfg.ws.ping_interval,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        st = self._cfg.state
        async with trio.open_nursery() as nursery:
            # The price API costs no RPC credits: the credit budget never stretches it.
            nursery.start_soon(self._every, st.price_interval, "tokenPrice", self._read_price, False)
            nursery.start_soon(self._participants_loop)
            nursery.start_soon(self._jackpot_fallback)
            nursery.start_soon(self.pubsub.run)
            nursery.start_soon(self._watch_staleness)
            if self._cfg.upstream.credits_per_month > 0 and self._credits is not None:
                nursery.start_soon(self._watch_budget, self._credits)
            task_status.started()

    # -- the readers ----------------------------------------------------------------

    async def _read_price(self) -> None:
        mint = self._cfg.token.mint
        cached = await self._prices.get_price(mint, priority=Priority.STATE, refresh=True)
        if cached.stale:
            return
        if cached.value is None:
            self._warn_once("tokenPrice", f"the price API has no price for token.mint {mint}")
            self._state.mark_missing("tokenPrice", f"the price API has no price for mint {mint}")
        else:
            self._warned.discard("tokenPrice")
            self._state.update("tokenPrice", cached.value, source="poll")

    async def _read_participants(self) -> None:
        lottery = self._cfg.lottery
        token = self.participants.recount_started()
        up = self.pubsub.up
        result = await self._rpc.program_account_keys(
            lottery.program_id, lottery.participant_filters, priority=Priority.STATE, cached=False
        )
        if result.stale:
            return
        self.participants.recounted(result.value, result.slot, token)
        count = self.participants.count
        assert count is not None
        self._state.update("participants", count, slot=self.participants.slot, source="poll")
        if up and self.pubsub.up:
            self._synced.add("participants")

    async def _read_jackpot(self) -> None:
        pot = self._cfg.lottery.pot_account
        up = self.pubsub.up
        # getAccountInfo rather than getBalance: a missing pot must not read as a jackpot of 0.
        result = await self._rpc.get_multiple_accounts([pot], priority=Priority.STATE, cached=False,
                                                      data_slice=(0, 0))
        acct = result.value[0] if result.value else None
        self._set_jackpot(None if acct is None else acct.lamports, result.slot, "poll")
        if up and self.pubsub.up:
            self._synced.add("jackpot")

    def _set_jackpot(self, lamports: int | None, slot: int, source: str) -> None:
        pot = self._cfg.lottery.pot_account
        if lamports is None:
            self._warn_once("jackpot", f"lottery.pot_account {pot} does not exist (jackpot unknown, not ready)")
            self._state.mark_missing("jackpot", f"pot account {pot} does not exist", slot=slot, source=source)
        else:
            self._warned.discard("jackpot")
            self._state.update("jackpot", lamports, slot=slot, source=source)

    def _warn_once(self, name: str, message: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("%s", message)

    async def _attempt(self, name: str, read: Callable[[], Awaitable[None]]) -> bool:
        """One read; failures are logged once per outage, never raised. True if it worked."""
        self.polls[name] += 1
        try:
            await read()
        except (EdgeStateError, ValueError) as exc:
            self.errors[name] += 1
            if name not in self._failing:
                self._failing.add(name)
                log.warning("refreshing %s failed: %s: %s (serving the last value)", name, type(exc).__name__, exc)
            return False
        if name in self._failing:
            self._failing.discard(name)
            log.info("refreshing %s works again", name)
        return True

    async def _every(self, interval: float, name: str, read: Callable[[], Awaitable[None]], scaled: bool = True) -> None:
        while True:
            await self._attempt(name, read)
            if scaled:
                await self._sleep_scaled(interval)
            else:
                await trio.sleep(interval)

    # -- participants: pushed while PubSub is up, recounted now and then ---------------

    def _on_participant(self, pubkey: str, lamports: int, slot: int) -> None:
        if self.participants.pushed(pubkey, lamports, slot):
            count = self.participants.count
            self._state.update("participants", count, slot=self.participants.slot, source="push")
        if self.participants.overflowed:
            self._participants_wakeup.set()  # recount early rather than remember without bound

    async def _participants_loop(self) -> None:
        st = self._cfg.state
        while True:
            self._participants_wakeup = trio.Event()
            ok = await self._attempt("participants", self._read_participants)
            if not ok:
                interval = st.participants_interval  # retry soon: pushes need a base to count from
            elif self.pubsub.up and self.push_participants:
                interval = st.participants_reconcile_interval
            else:
                interval = st.participants_interval
            wakeup = self._participants_wakeup
            start = trio.current_time()
            while not wakeup.is_set():  # sleep interval x scale; a rescale re-plans
                rescaled = self._rescaled
                with trio.move_on_at(start + interval * self.scale):
                    async with trio.open_nursery() as waiters:
                        for event in (wakeup, rescaled):
                            waiters.start_soon(_set_then_cancel, event, waiters.cancel_scope)
                if not rescaled.is_set():
                    break

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

    def _on_push(self, lamports: int | None, slot: int) -> None:
        self._set_jackpot(lamports, slot, "push")

    def _on_alive(self) -> None:
        # The socket answered a ping: its subscriptions are live, the pushed values current.
        if self._synced:
            self._state.confirm(tuple(sorted(self._synced)))

    def _on_pubsub_state(self, up: bool) -> None:
        # On every (re)subscribe read once: a change while we were away is not lost.
        self._synced.clear()
        self._push_changed.set()
        self._participants_wakeup.set()  # up: recount now; down: poll from now on
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
        while len(samples) > 2 and now - samples[1][0] >= BUDGET_WINDOW:
            samples.popleft()
        t0, c0 = samples[0]
        if now - t0 <= 0:
            return False
        self.projected = (granted_credits - c0) / (now - t0) * SECONDS_PER_MONTH
        if now - t0 < BUDGET_SETTLE:
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

    async def _watch_budget(self, credits: Callable[[], float]) -> None:
        while True:
            self.budget_tick(trio.current_time(), float(credits()))
            await trio.sleep(_BUDGET_EVERY)

    def budget_stats(self) -> dict[str, Any]:
        """The ``budget`` figures of /stats (``upstream.credits_per_month`` and what it does)."""
        budget = self._cfg.upstream.credits_per_month
        projected = self.projected
        pool = getattr(self._rpc, "pool", None)
        if projected is None and pool is not None:
            projected = pool.credits.projected_per_month()
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
        """JSON-ready: polls, errors, where each field comes from, the PubSub connection."""
        pushed = self.pubsub.up
        p = self.participants
        return {
            "polls": dict(self.polls),
            "errors": dict(self.errors),
            "failing": sorted(self._failing),
            "jackpot_source": "push" if pushed else "poll",
            "participants_source": "push" if pushed and self.push_participants else "poll",
            "participants": {"tracked": p.count, "pushes": p.pushes, "recounts": p.recounts},
            "synced_by_subscription": sorted(self._synced),
            "interval_scale": round(self.scale, 3),
            "pubsub": self.pubsub.stats(),
        }


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
