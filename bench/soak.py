"""Soak: N clients (10k) for a long window (10 min) with a state change every second;
server RSS and CPU sampled over time, every delivery checked (analysed a minute at a time)."""

from __future__ import annotations

import json
import time
from typing import Any

from .common import AddressPool, Procs, cpu_s, log, machine, rss_kb, save_result
from .fanout import _analyse
from .stack import KeepAlive, LoadClients, Stack


def run(n: int = 10_000, minutes: float = 10.0, period: float = 1.0, rate: float = 4000.0) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "n": n, "minutes": minutes, "period_s": period,
                              "samples": [], "chunks": []}
    pool = AddressPool()
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate()
        sim = KeepAlive("127.0.0.1", stack.sim_port)
        pid = stack.es_pid
        result["rss_idle_kb"] = rss_kb(pid)
        clients = LoadClients(procs, pool, name="lc-soak")
        try:
            clients.add(f"ws://127.0.0.1:{stack.es_port}/ws", n, rate=rate)
            clients.reset()
            t_start = time.monotonic()
            lamports = 9_000_000_000
            chunk_s = min(60.0, minutes * 60)
            while time.monotonic() - t_start < minutes * 60:
                sent = []
                t_chunk = time.monotonic()
                while time.monotonic() - t_chunk < chunk_s:
                    lamports += 1_000_003
                    t = time.time()
                    sim.post("/control/jackpot", json.dumps({"lamports": lamports}).encode())
                    sent.append((lamports, t))
                    result["samples"].append({"t_s": round(time.monotonic() - t_start, 1), "rss_kb": rss_kb(pid),
                                              "cpu_s": cpu_s(pid)})
                    time.sleep(period)
                # Let the chunk's last update reach every client before counting (its p99 can
                # be several hundred ms at 10k): otherwise late deliveries read as "missing".
                time.sleep(2.5)
                a = _analyse(clients.dump("soak"), sent, n)
                clients.reset()
                st = stack.es_stats()["broadcaster"]
                chunk = {k: a[k] for k in ("p50_ms", "p99_ms", "last_ms_max", "missing", "duplicates", "expected")}
                chunk.update(t_s=round(time.monotonic() - t_start, 1), subscribers=st["subscribers"],
                             slow_closed=st["slow_clients_closed"], rss_kb=rss_kb(pid))
                result["chunks"].append(chunk)
                log(f"  soak t={chunk['t_s']}s: rss {chunk['rss_kb'] // 1024} MB, missing {chunk['missing']}, "
                    f"p99 {chunk['p99_ms']} ms, subscribers {chunk['subscribers']}")
        finally:
            clients.close()
    save_result("soak", result)
    return result
