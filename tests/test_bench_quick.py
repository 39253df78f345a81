"""Keeps the benchmark harness (bench/) from rotting: its Python-only scenario at tiny scale.

Starts the simulator and edgestate as real processes on loopback (as ``python -m bench``
does), asks for 10 wallets' balances, and checks the harness's bookkeeping. No apt, no npm,
nothing written under docs/ or bench/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

bench_balances = pytest.importorskip("bench.balances")


def test_balances_scenario_tiny() -> None:
    result = bench_balances.run([10], warm_repeats=1, save=False)
    (row,) = result["rows"]
    assert row["wallets"] == 10
    assert row["funded"] == 5  # half the wallets hold a token account
    assert row["cold_account_calls"] >= 1
    assert result["machine"]["cores"] >= 1


def test_fanout_analysis_counts_missing_and_latency() -> None:
    from bench.fanout import _analyse

    sent = [(7_000_000_000, 100.0), (7_001_000_000, 101.0)]
    dumps = [{
        "records": {"7.0": {"t": [100_010.0, 100_020.0], "c": [0, 1]}, "7.001": {"t": [101_005.0], "c": [0]}},
        "stats": {"open": 2},
    }]
    a = _analyse(dumps, sent, 2)
    assert a["missing"] == 1 and a["expected"] == 4 and a["deliveries"] == 3
    assert a["last_ms_max"] == pytest.approx(20.0)


def test_cost_bench_runs_in_virtual_time():
    # Issue 11: a few virtual minutes, to keep `python -m bench cost` working (its full
    # run is in docs/benchmarks.md).
    import trio
    import trio.testing

    from bench import cost

    out = trio.run(cost.measure, 0.05, 30.0, 30.0, clock=trio.testing.MockClock(autojump_threshold=0))
    pushed, polled = out["rows"]
    assert pushed["joins_seen"] == pushed["joins"] >= 5
    assert pushed["join_latency_s_max"] < 1.0 < polled["join_latency_s_mean"]
    assert pushed["calls_by_method_per_month"].get("getProgramAccounts", 0) == 0  # no recount due yet
    assert polled["rpc_credits_per_month"] > 2_000_000
