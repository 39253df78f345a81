"""SharedState: slot ordering, change detection, subscribers, staleness on MockClock."""

from __future__ import annotations

import contextlib
import json

import trio
import trio.testing

from edgestate.state import SharedState
from tests.conftest import make_config


def new_state(**state_cfg: float) -> SharedState:
    return SharedState(make_config(state=state_cfg or {"max_staleness": 10.0}))


def fill(state: SharedState, slot: int = 5) -> None:
    state.update("tokenPrice", 0.5)
    state.update("jackpot", 2_000_000_000, slot=slot, source="push")
    state.update("participants", 7, slot=slot)


async def test_older_slot_dropped_and_unchanged_not_published(autojump_clock):
    state = new_state()
    fill(state, slot=10)
    version = state.snapshot.version
    assert not state.update("jackpot", 1_000_000_000, slot=9)  # a slow poll behind a push
    assert state.snapshot.jackpot == 2.0
    assert not state.update("jackpot", 2_000_000_000, slot=11)  # same value: nothing to send
    assert state.snapshot.version == version
    assert state.update("jackpot", 3_000_000_000, slot=12)
    body = json.loads(state.snapshot.body)
    assert body["jackpot"] == 3.0 and body["slot"] == 12 and body["version"] == version + 1
    assert state.stats()["dropped_older_slot"] == 1


async def test_subscribe_and_unsubscribe(autojump_clock):
    state = new_state()
    seen: list[int] = []
    unsubscribe = state.subscribe(lambda snap: seen.append(snap.version))
    fill(state)
    unsubscribe()
    state.update("participants", 8)
    assert seen == [1, 2, 3]


async def test_async_iterator_gives_the_newest_and_skips_intermediates(autojump_clock):
    state = new_state()
    got: list[float | None] = []

    async def consume() -> None:
        async with contextlib.aclosing(state.updates()) as updates:
            async for snap in updates:
                got.append(snap.jackpot)
                if snap.jackpot == 3.0:
                    return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        state.update("jackpot", 1_000_000_000, slot=1)
        state.update("jackpot", 2_000_000_000, slot=2)  # before the consumer runs: skipped
        state.update("jackpot", 3_000_000_000, slot=3)
    assert got == [None, 3.0]


async def test_readiness_and_stale_flag_follow_max_staleness(autojump_clock):
    state = new_state(max_staleness=10.0)
    ok, reason = state.ready()
    assert not ok and "no upstream data yet" in reason
    fill(state)
    assert state.ready() == (True, "") and state.snapshot.stale is False
    await trio.sleep(6)
    state.update("tokenPrice", 0.5)  # confirmed, the others are not
    await trio.sleep(5)
    ok, reason = state.ready()
    assert not ok and "jackpot" in reason and "tokenPrice" not in reason
    assert state.refresh_staleness() and state.snapshot.stale is True
    assert json.loads(state.snapshot.body)["stale"] is True
