"""Upstream amplification: U users, each holding a WebSocket and polling GET /api/state every
30 s through nginx proxy_cache (the old frontend's poll, as a CDN would see it). The 30 s
period is kept as a rate (U/30 requests per second) over a shorter window. Reported: what
reaches edgestate and what reaches the (simulated) provider. Beside it, the "before" line:
the same pollers sent straight at the provider (getBalance via JSON-RPC POST /), measured.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from .common import AddressPool, Procs, cpu_s, log, machine, rss_kb, save_result
from .stack import KeepAlive, LoadClients, Stack

POLL_PERIOD_S = 30.0


def _changer(stack: Stack, stop: threading.Event) -> None:
    """A state change every second during the run, as a live lottery would have."""
    sim = KeepAlive("127.0.0.1", stack.sim_port)
    lamports = 5_000_000_000
    while not stop.wait(1.0):
        lamports += 1_000_007
        try:
            sim.post("/control/jackpot", json.dumps({"lamports": lamports}).encode())
        except OSError:
            pass


def _upstream_calls(stack: Stack) -> int:
    c = stack.sim_counters()
    return int(c["rpc_calls"]) + int(c["price_requests"])


def _poll_window(stack: Stack, procs: Procs, pool: AddressPool, url: str, rate: float, window: float,
                 method: str = "GET", body: str | None = None, origin_pid: int | None = None) -> dict[str, Any]:
    pollers = LoadClients(procs, pool, name="poller")
    try:
        up0 = _upstream_calls(stack)
        api0 = stack.es_stats()["api"]["requests"] if origin_pid else 0
        cpu0 = cpu_s(origin_pid) if origin_pid else 0.0
        t0 = time.monotonic()
        pollers.add(None, 0, poll={"url": url, "rate": rate, "method": method, "body": body},
                    nprocs=1 if rate < 1500 else 2)
        time.sleep(window)
        dumps = pollers.dump("poll")
        dt = time.monotonic() - t0
        up1 = _upstream_calls(stack)
        api1 = stack.es_stats()["api"]["requests"] if origin_pid else 0
        cpu1 = cpu_s(origin_pid) if origin_pid else 0.0
    finally:
        pollers.close()
    polls = [d["poll"] for d in dumps]
    return {
        "window_s": round(dt, 2),
        "poll_rate_target": round(rate, 2),
        "polls_sent_per_s": round(sum(p["sent"] for p in polls) / dt, 2),
        "polls_ok": sum(p["ok"] for p in polls),
        "polls_failed": sum(p["sent"] - p["ok"] for p in polls),
        "poll_p50_ms": max((p["p50_ms"] or 0) for p in polls),
        "poll_p99_ms": max((p["p99_ms"] or 0) for p in polls),
        "upstream_calls_per_s": round((up1 - up0) / dt, 2),
        "origin_requests_per_s": round((api1 - api0 - 1) / dt, 2) if origin_pid else None,
        "origin_cpu_pct": round((cpu1 - cpu0) / dt * 100, 1) if origin_pid else None,
    }


def run(users: list[int], window: float = 10.0, rate: float = 4000.0) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "users": users, "window_s": window,
                              "poll_period_s": POLL_PERIOD_S, "rows": []}
    pool = AddressPool()
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate()
        stack.start_nginx(proxy_cache=True)
        rss_idle = rss_kb(stack.es_pid)
        holders = LoadClients(procs, pool, name="ws-holder")
        stop = threading.Event()
        changer = threading.Thread(target=_changer, args=(stack, stop), daemon=True)
        changer.start()
        connected = 0
        try:
            for u in users:
                holders.add(f"ws://127.0.0.1:{stack.es_port}/ws", u - connected, rate=rate)
                connected = u
                time.sleep(1.0)
                after = _poll_window(stack, procs, pool, stack.ng + "/api/state", u / POLL_PERIOD_S, window,
                                     origin_pid=stack.es_pid)
                before = _poll_window(
                    stack, procs, pool, stack.sim + "/", u / POLL_PERIOD_S, window, method="POST",
                    body=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "getBalance",
                                     "params": ["Lotto1Pot1111111111111111111111111111111111"]}))
                row = {"users": u, "after": after, "before": before,
                       "ws_subscribers": stack.es_stats()["broadcaster"]["subscribers"],
                       "edgestate_rss_mb": round(rss_kb(stack.es_pid) / 1024, 1),
                       "edgestate_rss_idle_mb": round(rss_idle / 1024, 1)}
                result["rows"].append(row)
                log(f"  users={u}: via edgestate+CDN {after['origin_requests_per_s']} origin req/s, "
                    f"{after['upstream_calls_per_s']} upstream calls/s (edgestate CPU {after['origin_cpu_pct']}%); "
                    f"before (direct) {before['upstream_calls_per_s']} upstream calls/s")
        finally:
            stop.set()
            holders.close()
    save_result("amplification", result)
    return result
