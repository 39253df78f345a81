"""Quota budget: upstream.credits_per_month stretches a root's polling (issue 7)."""

from __future__ import annotations

import pytest
import trio

from edgestate.refresh import BUDGET_SETTLE, BUDGET_WINDOW, SECONDS_PER_MONTH, Refresher, interval_scale
from edgestate.state import SharedState
from tests.conftest import make_config


def test_interval_scale():
    assert interval_scale(0, 1_000_000) == 1.0
    assert interval_scale(5_000_000, 0) == 1.0  # no budget
    assert interval_scale(900_000, 1_000_000) == 1.0  # within budget
    assert interval_scale(2_000_000, 1_000_000) == 2.0
    assert interval_scale(50_000_000, 1_000_000) == 10.0  # bounded
    assert interval_scale(50_000_000, 1_000_000, max_scale=3.0) == 3.0
    # Measured while already stretched x4: the unstretched burn would be 4x as high.
    assert interval_scale(500_000, 1_000_000, current=4.0) == 2.0
    assert interval_scale(200_000, 1_000_000, current=4.0) == 1.0
    assert interval_scale(float("nan"), 1_000_000) == 1.0


class _Prices:
    def __init__(self) -> None:
        self.at: list[float] = []

    async def get_price(self, mint, *, priority, refresh):
        self.at.append(trio.current_time())
        raise ValueError("not needed here")


def _refresher(**upstream) -> tuple[Refresher, _Prices]:
    cfg = make_config(None, upstream=upstream, state={"price_interval": 2.0})
    prices = _Prices()
    return Refresher(cfg, SharedState(cfg), rpc=None, prices=prices), prices  # type: ignore[arg-type]


def test_budget_tick_waits_for_a_settled_measurement():
    refresher, _ = _refresher(credits_per_month=1_000_000, max_interval_scale=10.0)
    per_s = 3 * 1_000_000 / SECONDS_PER_MONTH  # three times the budget
    S = BUDGET_SETTLE
    assert not refresher.budget_tick(0.0, 0.0)
    assert not refresher.budget_tick(S - 10, (S - 10) * per_s)  # not settled yet: no decision
    assert refresher.projected == pytest.approx(3_000_000)
    assert refresher.budget_tick(S, S * per_s)
    assert refresher.scale == pytest.approx(3.0)
    # At x3 the burn is on budget: it stays there.
    for t in range(int(S) + 5, int(4 * S), 5):
        assert not refresher.budget_tick(float(t), S * per_s + (t - S) * per_s / 3)
    assert refresher.scale == pytest.approx(3.0)
    stats = refresher.budget_stats()
    assert stats["interval_scale"] == 3.0 and not stats["over_budget"]
    # Demand drops (fewer user lookups): the scale comes back down, never below 1.
    base = S * per_s + 3 * S * per_s / 3
    refresher.budget_tick(4 * S + 5, base)
    assert refresher.budget_tick(4 * S + 15 + BUDGET_WINDOW, base)  # a window with no burn
    assert refresher.scale == 1.0


async def test_polling_stretches_on_the_clock(autojump_clock, nursery):
    refresher, prices = _refresher(credits_per_month=1_000_000)
    nursery.start_soon(refresher._every, 2.0, "tokenPrice", refresher._read_price)
    await trio.sleep(5.0)
    assert prices.at == [0.0, 2.0, 4.0]
    # 5x over budget, settled: the next read moves from t=6 to t=4 + 2*5 = 14.
    per_s = 5 * 1_000_000 / SECONDS_PER_MONTH
    refresher.budget_tick(5.0 - BUDGET_SETTLE, 0.0)
    assert refresher.budget_tick(5.0, BUDGET_SETTLE * per_s)
    assert refresher.scale == pytest.approx(5.0)
    await trio.sleep(20.0)
    assert prices.at == [0.0, 2.0, 4.0, 14.0, 24.0]
    nursery.cancel_scope.cancel()


class _NoRpc:
    async def program_account_keys(self, *args, **kwargs):
        raise ValueError("not needed here")

    async def get_multiple_accounts(self, *args, **kwargs):
        raise ValueError("not needed here")


async def test_the_budget_never_stretches_the_price_interval(autojump_clock, nursery):
    # Issue 11: the price API costs no RPC credits, yet the credit budget stretched its
    # interval along with the RPC polling.
    cfg = make_config(None, upstream={"credits_per_month": 1_000_000}, state={"price_interval": 2.0})
    prices = _Prices()
    refresher = Refresher(cfg, SharedState(cfg), rpc=_NoRpc(), prices=prices)  # type: ignore[arg-type]

    async def no_pubsub(*, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.sleep_forever()

    refresher.pubsub.run = no_pubsub  # type: ignore[method-assign]
    await nursery.start(refresher.run)
    per_s = 5 * 1_000_000 / SECONDS_PER_MONTH
    refresher.budget_tick(-BUDGET_SETTLE, 0.0)
    assert refresher.budget_tick(0.0, BUDGET_SETTLE * per_s) and refresher.scale == pytest.approx(5.0)
    await trio.sleep(9.0)
    assert prices.at == [0.0, 2.0, 4.0, 6.0, 8.0]  # every 2 s, whatever the scale
    nursery.cancel_scope.cancel()
