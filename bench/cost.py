"""What the upstream costs a month (issue 11): the default configuration against the simulator.

One process, one ``trio.run`` on a virtual clock (``trio.testing.MockClock`` with
autojump): two simulators on loopback, each fed the same lottery activity (a participant
joins every ``--join-every`` seconds and adds 0.1 SOL to the pot), and two edgestate
upstream stacks (pool, price client, refresher) with the default configuration:

* **pushed** (today): participants by programSubscribe on the pot's PubSub connection, a
  recount at every (re)subscribe and every ``state.participants_reconcile_interval``;
* **polled** (before issue 11): the same code with ``push_participants=False`` and no
  credit budget: getProgramAccounts every ``state.participants_interval`` with PubSub up.

Virtual time runs ``--hours`` of the lottery in seconds of real time; after a warm-up
minute, what each simulator counted (JSON-RPC calls by method, price requests, PubSub
connections and bytes) is projected to 30 days: credits at ``upstream.method_costs``
plus Helius's WebSocket metering (1 credit a connection, 2 credits per 0.1 MB streamed),
requests per second (peak over 1-second buckets, and mean), price requests, and how long a
join took to reach the shared state.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing

from edgestate import config
from edgestate.cache import Cache
from edgestate.refresh import Refresher
from edgestate.sim import World, serve_simulator
from edgestate.state import SharedState
from edgestate.upstream.costs import SECONDS_PER_MONTH, WS_CONNECT_CREDITS, WS_CREDITS_PER_BYTE
from edgestate.upstream.pool import Pool
from edgestate.upstream.prices import PriceClient
from edgestate.upstream.ratelimit import RateLimiter
from edgestate.upstream.rpc import SolanaRpc

from .common import log, machine, save_result

GOAL_CREDITS = 50_000  # issue 11: at most 5% of Helius Free's 1,000,000


@dataclass
class _Design:
    name: str
    world: World
    cfg: config.Config
    state: SharedState
    refresher: Refresher
    pool: Pool
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, rpc calls so far)
    changes: list[tuple[float, int]] = field(default_factory=list)  # (time, participants) published


def _config(sim: str, **sections: dict[str, Any]) -> config.Config:
    raw: dict[str, dict[str, Any]] = {
        "upstream": {"rpc_url": [sim], "ws_url": "ws" + sim[4:]},
        "price": {"url": sim + "/price/v3"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw, source="bench cost", environ={})


async def _design(nursery: trio.Nursery, name: str, *, push: bool, seed: int) -> _Design:
    base = config.from_dict({}, environ={})
    world = World.from_config(base, seed=seed)
    world.set_faults(max_ws_connections=5)  # Helius Free
    sim = await nursery.start(serve_simulator, world, "127.0.0.1:0")
    cfg = _config(sim) if push else _config(sim, upstream={"credits_per_month": 0})
    state = SharedState(cfg)
    cache = Cache(cfg.cache)
    pool = Pool(cfg.upstream, RateLimiter(cfg.upstream.max_requests_per_second, name="upstream"))
    prices = PriceClient(cfg.price, cache, batch_window=cfg.upstream.batch_window_ms / 1000)
    rpc = SolanaRpc(pool, cache, commitment=cfg.upstream.commitment)
    refresher = Refresher(cfg, state, rpc, prices, limiter=None, push_participants=push)
    design = _Design(name, world, cfg, state, refresher, pool)
    state.subscribe(lambda snap: design.changes.append((trio.current_time(), snap.participants or 0)))
    await nursery.start(pool.run)
    await nursery.start(prices.run)
    await nursery.start(refresher.run)
    return design


def _figures(d: _Design, counters0: dict[str, Any], counters1: dict[str, Any], seconds: float,
             joins: list[tuple[float, int]]) -> dict[str, Any]:
    scale = SECONDS_PER_MONTH / seconds
    methods = {m: n - counters0["rpc_methods"].get(m, 0) for m, n in counters1["rpc_methods"].items()}
    costs = d.cfg.upstream.method_costs
    rpc_credits = sum(costs.get(m, 1) * n for m, n in methods.items())
    connects = counters1["ws_connections_total"] - counters0["ws_connections_total"]
    ws_bytes = counters1["ws_bytes_sent"] - counters0["ws_bytes_sent"]
    ws_credits = connects * WS_CONNECT_CREDITS + ws_bytes * WS_CREDITS_PER_BYTE
    per_second = [b - a for (_, a), (_, b) in zip(d.samples, d.samples[1:])]
    calls = sum(methods.values())
    latencies = []
    for at, want in joins:
        seen = next((t for t, n in d.changes if t >= at and n >= want), None)
        if seen is not None:
            latencies.append(seen - at)
    return {
        "design": d.name,
        "credits_per_month": round((rpc_credits + ws_credits) * scale),
        "rpc_credits_per_month": round(rpc_credits * scale),
        "pubsub_credits_per_month": round(ws_credits * scale),
        "rpc_calls_per_month": round(calls * scale),
        "calls_by_method_per_month": {m: round(n * scale) for m, n in sorted(methods.items())},
        "rpc_req_per_s_peak": max(per_second, default=0),
        "rpc_req_per_s_mean": round(calls / seconds, 4),
        "price_requests_per_month": round((counters1["price_requests"] - counters0["price_requests"]) * scale),
        "pubsub_connections_peak": counters1["ws_connections_peak"],
        "pubsub_connects_in_window": connects,
        "pubsub_bytes_per_month": round(ws_bytes * scale),
        "join_latency_s_mean": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "join_latency_s_max": round(max(latencies), 3) if latencies else None,
        "joins_seen": len(latencies),
        "joins": len(joins),
    }


async def measure(hours: float, join_every: float, warmup: float) -> dict[str, Any]:
    """Both designs side by side on the current (virtual) clock; rows of figures."""
    async with trio.open_nursery() as nursery:
        designs = [await _design(nursery, "pushed (programSubscribe)", push=True, seed=1),
                   await _design(nursery, "polled (before issue 11)", push=False, seed=1)]
        await trio.sleep(warmup)
        t0 = trio.current_time()
        start = {d.name: d.world.counters() for d in designs}
        joins: list[tuple[float, int]] = []
        end = t0 + hours * 3600
        next_join = t0 + join_every / 2
        while trio.current_time() < end:
            now = trio.current_time()
            for d in designs:
                d.samples.append((now, int(d.world.counters()["rpc_calls"])))
            if now >= next_join:
                for d in designs:
                    d.world.add_participants(1)
                    d.world.add_jackpot(100_000_000)
                joins.append((now, designs[0].world.participant_count()))
                next_join += join_every
            await trio.sleep(1.0)
        seconds = trio.current_time() - t0
        rows = [_figures(d, start[d.name], d.world.counters(), seconds, joins) for d in designs]
        nursery.cancel_scope.cancel()
    return {"seconds": seconds, "rows": rows}


def run(hours: float = 2.0, join_every: float = 30.0, warmup: float = 60.0) -> dict[str, Any]:
    """Run the scenario and save bench/results/cost.json (virtual time; seconds of real time)."""
    t_real = time.monotonic()
    clock = trio.testing.MockClock(autojump_threshold=0)
    out = trio.run(measure, hours, join_every, warmup, clock=clock)
    real = time.monotonic() - t_real
    pushed, polled = out["rows"]
    result = {
        "machine": machine(),
        "virtual_hours": hours,
        "join_every_s": join_every,
        "warmup_s": warmup,
        "real_seconds": round(real, 1),
        "goal_credits_per_month": GOAL_CREDITS,
        "meets_goal": pushed["credits_per_month"] <= GOAL_CREDITS,
        "rows": out["rows"],
        "config": {
            "participants_reconcile_interval": config.StateConfig().participants_reconcile_interval,
            "participants_interval": config.StateConfig().participants_interval,
            "price_interval": config.StateConfig().price_interval,
            "max_requests_per_second": config.UpstreamConfig().max_requests_per_second,
            "method_costs": dict(config.UpstreamConfig().method_costs),
        },
    }
    save_result("cost", result)
    for row in out["rows"]:
        log(f"cost: {row['design']}: {row['credits_per_month']:,} credits/month, peak {row['rpc_req_per_s_peak']} "
            f"req/s, mean {row['rpc_req_per_s_mean']} req/s, {row['price_requests_per_month']:,} price "
            f"requests/month, join latency mean {row['join_latency_s_mean']} s")
    log(f"cost: {hours:g} virtual hours in {real:.1f} s real; goal <= {GOAL_CREDITS:,}: "
        f"{'met' if result['meets_goal'] else 'NOT met'}")
    if not math.isfinite(real):  # pragma: no cover
        raise RuntimeError("clock")
    return result


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run(0.1), indent=1))
