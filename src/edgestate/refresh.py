"""Keeps the shared state fresh with a few upstream calls per second.

    refresher.run
    ├── price loop          token.mint price every state.price_interval
    ├── participants loop   getProgramAccounts count every state.participants_interval
    ├── jackpot PubSub      accountSubscribe(pot): pushed the moment it changes
    ├── jackpot fallback    polls every state.polling_interval while PubSub is down
    └── staleness watch     republishes when the snapshot's ``stale`` flag flips

Every read goes through the gateway at ``Priority.STATE``, ahead of user lookups.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .config import Config
from .errors import EdgeStateError
from .state import SharedState
from .upstream.prices import PriceClient
from .upstream.pubsub import AccountSubscription
from .upstream.ratelimit import Priority
from .upstream.rpc import SolanaRpc

log = logging.getLogger("edgestate.refresh")


class Refresher:
    """The tasks that feed :class:`SharedState` from upstream."""

    def __init__(self, cfg: Config, state: SharedState, rpc: SolanaRpc, prices: PriceClient) -> None:
        self._cfg = cfg
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
            task_status.started()

    # -- the readers ----------------------------------------------------------------

    async def _read_price(self) -> None:
        cached = await self._prices.get_price(self._cfg.token.mint, priority=Priority.STATE, refresh=True)
        if not cached.stale:
            self._state.update("tokenPrice", cached.value, source="poll")

    async def _read_participants(self) -> None:
        lottery = self._cfg.lottery
        result = await self._rpc.count_program_accounts(
            lottery.program_id, lottery.participant_filters, priority=Priority.STATE
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
            await trio.sleep(interval)

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
                with trio.move_on_after(interval):
                    await self._push_changed.wait()

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
            "pubsub": self.pubsub.stats(),
        }
