"""The upstream gateway's own overhead and its coalescing ratio (issue 3).

The simulator runs as its own process (zero latency, no rate limit); the pool runs in this
process with no rate limit, so the figures are what the pool (queue, batcher, workers,
JSON, httpx) costs per call.

- throughput: N concurrent distinct ``getSlot`` calls (distinct ``minContextSlot`` so they
  are neither deduplicated nor merged), batched (window 100 ms / 1 ms, up to 100 a batch)
  and unbatched (``max_batch_size = 1``); and N distinct ``getBalance`` calls, which the
  pool merges into ``getMultipleAccounts`` of 100 keys.
- coalescing: a realistic mix through SolanaRpc + Cache (single-flight, 5 s TTL): users ask
  the pot's balance (70 %), one of 50 popular wallets (20 %), a random wallet (10 %);
  ratio = calls made by users / JSON-RPC calls that reached the simulator.
"""

from __future__ import annotations

import random
import time
from typing import Any

import trio
from solders.pubkey import Pubkey

from edgestate import config
from edgestate.cache import Cache
from edgestate.upstream.pool import Pool
from edgestate.upstream.ratelimit import RateLimiter
from edgestate.upstream.rpc import SolanaRpc

from .common import Procs, free_port, http, log, machine, python, save_result, wait_http


def _cfg(sim: str, **upstream: Any) -> config.Config:
    raw = {"upstream": {"rpc_url": [sim], "max_requests_per_second": 1e9, "max_queue": 100_000, **upstream}}
    return config.from_dict(raw, source="bench", environ={})


def _counters(sim: str) -> dict[str, Any]:
    return http("GET", sim + "/control/stats")[1]["counters"]


async def _throughput(sim: str, n: int, method: str, **upstream: Any) -> dict[str, Any]:
    cfg = _cfg(sim, **upstream)
    pool = Pool(cfg.upstream, RateLimiter(1e9))
    keys = [str(Pubkey.new_unique()) for _ in range(n)] if method == "getBalance" else []
    before = _counters(sim)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def one(i: int) -> None:
            if method == "getBalance":
                await pool.execute("getBalance", [keys[i], {"commitment": "confirmed"}])
            else:
                await pool.execute("getSlot", [{"commitment": "confirmed", "minContextSlot": i}])

        t0, cpu0 = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as calls:
            for i in range(n):
                calls.start_soon(one, i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    after = _counters(sim)
    return {
        "method": method,
        "calls": n,
        "window_ms": cfg.upstream.batch_window_ms,
        "max_batch_size": cfg.upstream.max_batch_size,
        "wall_s": round(wall, 3),
        "calls_per_s": round(n / wall),
        "cpu_us_per_call": round(cpu / n * 1e6, 1),
        "http_requests": after["rpc_requests"] - before["rpc_requests"],
        "upstream_calls": after["rpc_calls"] - before["rpc_calls"],
    }


async def _coalescing(sim: str, users: int, seconds: float, rate: float) -> dict[str, Any]:
    cfg = _cfg(sim)
    pool = Pool(cfg.upstream, RateLimiter(1e9))
    rpc = SolanaRpc(pool, Cache(cfg.cache), commitment="confirmed")
    pot = cfg.lottery.pot_account
    popular = [str(Pubkey.new_unique()) for _ in range(50)]
    rng = random.Random(7)
    made = 0
    before = _counters(sim)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def user() -> None:
            nonlocal made
            while True:
                await trio.sleep(rng.expovariate(rate / users))
                r = rng.random()
                key = pot if r < 0.7 else rng.choice(popular) if r < 0.9 else str(Pubkey.new_unique())
                await rpc.get_balance(key)
                made += 1

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as crowd:
                for _ in range(users):
                    crowd.start_soon(user)
        nursery.cancel_scope.cancel()
    after = _counters(sim)
    upstream = after["rpc_calls"] - before["rpc_calls"]
    return {
        "users": users,
        "seconds": seconds,
        "user_calls": made,
        "user_calls_per_s": round(made / seconds, 1),
        "upstream_calls": upstream,
        "upstream_http_requests": after["rpc_requests"] - before["rpc_requests"],
        "upstream_calls_per_s": round(upstream / seconds, 2),
        "ratio": round(made / max(1, upstream), 1),
    }


def run(n: int = 5000, coalescing_s: float = 10.0, save: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "throughput": [], "coalescing": {}}
    with Procs() as procs:
        port = free_port()
        sim = f"http://127.0.0.1:{port}"
        procs.start("pool-sim", [python(), "-m", "edgestate", "simulate", "--bind", f"127.0.0.1:{port}"], cpus="1")
        wait_http(sim + "/control/stats")
        for method, upstream in (
            ("getSlot", {}),
            ("getSlot", {"batch_window_ms": 1}),
            ("getSlot", {"max_batch_size": 1, "batch_window_ms": 0}),
            ("getBalance", {}),
        ):
            row = trio.run(lambda m=method, u=upstream: _throughput(sim, n, m, **u))
            log(f"pool {row}")
            result["throughput"].append(row)
        result["coalescing"] = trio.run(_coalescing, sim, 1000, coalescing_s, 500.0)
        log(f"coalescing {result['coalescing']}")
    if save:
        save_result("pool", result)
    return result
