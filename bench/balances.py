"""Balances: POST /api/tokens/balances for 10, 100 and 1,000 wallets: latency and upstream calls.

Half of the wallets hold an associated token account of a fresh SPL mint in the simulator,
the other half have none (→ 0). "cold" = wallets never asked before (nothing cached);
"warm" = the same request repeated (per (wallet, mint) cache).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

from solders.pubkey import Pubkey

from .common import Procs, http, log, machine, save_result
from .stack import Stack


def _methods(stack: Stack) -> Counter[str]:
    c = stack.sim_counters()
    return Counter({**c["rpc_methods"], "(rpc_calls)": c["rpc_calls"], "(http_requests)": c["http_requests"]})


def run(sizes: list[int], warm_repeats: int = 10, save: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "sizes": sizes, "rows": []}
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate()
        mint = str(Pubkey.new_unique())
        status, body = http("POST", stack.sim + "/control/mint", {"mint": mint, "decimals": 6})
        assert status == 200, body
        wallets_by_size = {}
        for n in sizes:
            wallets = [str(Pubkey.new_unique()) for _ in range(n)]
            for i, w in enumerate(wallets[::2]):
                http("POST", stack.sim + "/control/token-balance", {"wallet": w, "mint": mint, "amount": 1_000_000 * (i + 1)})
            wallets_by_size[n] = wallets
        time.sleep(0.5)
        for n in sizes:
            req = {"wallets": wallets_by_size[n], "tokenMint": mint}
            m0 = _methods(stack)
            t0 = time.perf_counter()
            status, body = http("POST", stack.es + "/api/tokens/balances", req, timeout=60)
            cold_ms = (time.perf_counter() - t0) * 1000
            m1 = _methods(stack)
            assert status == 200, body
            nonzero = sum(1 for v in body["balances"].values() if v)
            warm = []
            for _ in range(warm_repeats):
                t0 = time.perf_counter()
                http("POST", stack.es + "/api/tokens/balances", req, timeout=60)
                warm.append((time.perf_counter() - t0) * 1000)
            m2 = _methods(stack)
            delta_cold = {k: v for k, v in (m1 - m0).items() if v}
            delta_warm = {k: v for k, v in (m2 - m1).items() if v}
            # Background pollers (price, participants) may land in the window: leave them visible
            # but count the calls that belong to the request.
            account_calls = delta_cold.get("getMultipleAccounts", 0) + delta_cold.get("getAccountInfo", 0)
            row = {"wallets": n, "funded": nonzero, "cold_ms": round(cold_ms, 1),
                   "warm_p50_ms": round(statistics.median(warm), 1), "warm_max_ms": round(max(warm), 1),
                   "cold_methods": delta_cold, "warm_methods": delta_warm, "cold_account_calls": account_calls}
            result["rows"].append(row)
            log(f"  balances {n}: cold {row['cold_ms']} ms ({delta_cold}), warm p50 {row['warm_p50_ms']} ms ({delta_warm})")
    if save:
        save_result("balances", result)
    return result
