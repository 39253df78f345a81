"""Fan-out: N WebSocket clients on one edgestate process vs nginx+nchan, same client, same message.

For each N the clients are topped up (1k → 5k → 10k → 19k), then ``updates`` state changes
are made, each to a known, unique jackpot value; the harness records the wall clock just
before each change (edgestate: POST /control/jackpot at the simulator, which pushes it over
PubSub; nchan: POST of the same stateUpdate JSON to nchan's publisher). The clients record
the receive time of the frame carrying each value.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

from .common import AddressPool, Procs, cpu_s, http, log, machine, rss_kb, save_result
from .stack import KeepAlive, LoadClients, Stack, nchan_publisher

BASE_LAMPORTS = 7_000_000_000


def _interval(n: int) -> float:
    # Long enough for the slowest of server and client to finish a broadcast (~25 µs/client).
    return max(0.3, 0.15 + n * 50e-6)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * (len(values) - 1) + 0.5))]


def _analyse(dumps: list[dict[str, Any]], sent: list[tuple[int, float]], n: int) -> dict[str, Any]:
    """Latencies (ms) per (client, update), per-update last client, missing and duplicate deliveries."""
    by_value = {lamports: t for lamports, t in sent}
    lat: list[float] = []
    last: dict[int, float] = {}
    received = {lamports: set() for lamports, _ in sent}
    dup = 0
    for proc_i, d in enumerate(dumps):
        for key, rec in d["records"].items():
            try:
                lamports = round(float(key) * 1e9)
            except ValueError:
                continue
            t0 = by_value.get(lamports)
            if t0 is None:
                continue
            for t_ms, c in zip(rec["t"], rec["c"]):
                who = (proc_i, c)
                if who in received[lamports]:
                    dup += 1
                    continue
                received[lamports].add(who)
                ms = t_ms - t0 * 1000
                lat.append(ms)
                if ms > last.get(lamports, -1e9):
                    last[lamports] = ms
    # Clients whose connection failed are counted apart (clients_failed): missing is over open ones.
    n_open = sum(d["stats"]["open"] for d in dumps)
    missing = sum(n_open - len(r) for r in received.values())
    lasts = list(last.values())
    return {
        "p50_ms": round(_pct(lat, 0.5), 2),
        "p99_ms": round(_pct(lat, 0.99), 2),
        "last_ms_median": round(statistics.median(lasts), 2) if lasts else None,
        "last_ms_max": round(max(lasts), 2) if lasts else None,
        "deliveries": len(lat),
        "expected": n_open * len(sent),
        "missing": missing,
        "duplicates": dup,
        "client_stats": [d["stats"] for d in dumps],
    }


def _sweep(name: str, ns: list[int], updates: int, procs: Procs, pool: AddressPool, ws_url: str,
           pid: int, publish: Callable[[int], float], subscribers: Callable[[], Any],
           extra: Callable[[], dict[str, Any]] | None, rate: float) -> list[dict[str, Any]]:
    clients = LoadClients(procs, pool, name=f"lc-{name}")
    time.sleep(1.0)
    rss_idle = rss_kb(pid)
    rows = []
    connected = 0
    seq = 0
    try:
        for n in ns:
            t_conn = time.monotonic()
            clients.add(ws_url, n - connected, rate=rate)
            connect_s = time.monotonic() - t_conn
            connected = n
            time.sleep(1.5)  # let handshakes and first frames settle
            rss_n = rss_kb(pid)
            subs = subscribers()
            clients.reset()
            interval = _interval(n)
            sent: list[tuple[int, float]] = []
            cpu0 = cpu_s(pid)
            t_start = time.monotonic()
            for _ in range(updates):
                seq += 1
                lamports = BASE_LAMPORTS + seq * 1_000_003
                sent.append((lamports, publish(lamports)))
                time.sleep(interval)
            cpu1 = cpu_s(pid)
            window = time.monotonic() - t_start
            time.sleep(0.5)
            dumps = clients.dump(f"{name}-{n}")
            a = _analyse(dumps, sent, n)
            row = {
                "server": name,
                "n": n,
                "updates": updates,
                "interval_s": interval,
                "connect_s": round(connect_s, 2),
                "connect_rate": round((n - (rows[-1]["n"] if rows else 0)) / connect_s, 1),
                "subscribers": subs,
                "rss_idle_kb": rss_idle,
                "rss_kb": rss_n,
                "rss_per_conn_kb": round((rss_n - rss_idle) / n, 2),
                "cpu_window_s": round(cpu1 - cpu0, 3),
                "window_s": round(window, 2),
                "cpu_per_broadcast_ms": round((cpu1 - cpu0) / updates * 1000, 2),
                "cpu_per_client_us": round((cpu1 - cpu0) / updates / n * 1e6, 2),
                **{k: v for k, v in a.items() if k != "client_stats"},
                "clients_open": sum(s["open"] for s in a["client_stats"]),
                "clients_failed": sum(s["failed"] for s in a["client_stats"]),
            }
            if extra:
                row["server_stats"] = extra()
            rows.append(row)
            log(f"  {name} N={n}: p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, last {row['last_ms_median']} ms, "
                f"cpu {row['cpu_per_client_us']} µs/client, rss {row['rss_per_conn_kb']} KB/conn, missing {row['missing']}")
            clients.reset()
    finally:
        clients.close()
    return rows


def run(ns: list[int], updates: int = 20, rate: float = 4000.0, skip_nchan: bool = False,
        skip_edgestate: bool = False, save: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "ns": ns, "updates": updates, "rows": []}
    pool = AddressPool()
    with Procs() as procs:
        stack = Stack(procs)
        # Heartbeat every 120 s: the window measures broadcasts, not pings (nchan pings nobody by default).
        stack.start_edgestate('[ws]\nping_interval = 120.0\n')
        _, state = http("GET", stack.es + "/api/state")
        sim = KeepAlive("127.0.0.1", stack.sim_port)
        # Make sure the pushed path works before we measure anything.
        sim.post("/control/jackpot", json.dumps({"lamports": BASE_LAMPORTS}).encode())
        time.sleep(0.5)

        def publish_es(lamports: int) -> float:
            t = time.time()
            sim.post("/control/jackpot", json.dumps({"lamports": lamports}).encode())
            return t

        def subs_es() -> Any:
            return stack.es_stats()["broadcaster"]["subscribers"]

        def extra_es() -> dict[str, Any]:
            b = stack.es_stats()["broadcaster"]
            return {k: b.get(k) for k in ("last_broadcast_ms", "p99_broadcast_ms", "last_broadcast_cpu_ms", "conflated",
                                          "slow_clients_closed", "frames_sent")}

        log(f"fan-out: edgestate (pid {stack.es_pid}) N={ns}, {updates} updates each")
        if not skip_edgestate:
          result["rows"] += _sweep("edgestate", ns, updates, procs, pool, f"ws://127.0.0.1:{stack.es_port}/ws",
                                   stack.es_pid, publish_es, subs_es, extra_es, rate)
        _, state = http("GET", stack.es + "/api/state")
        procs.stop_all()

        if skip_nchan:
            log("fan-out: nchan skipped")
        else:
            stack = Stack(procs)
            stack.start_nginx(nchan=True)
            publish_ng = nchan_publisher(stack.ng_port, state)

            def subs_ng() -> Any:
                _, info = http("GET", stack.ng + "/pub")  # nchan channel info
                if isinstance(info, (bytes, str)):
                    return None
                return info.get("subscribers")

            publish_ng(BASE_LAMPORTS)
            result["message_bytes"] = len(json.dumps({"type": "stateUpdate", "state": {**state, "jackpot": BASE_LAMPORTS / 1e9}}, separators=(",", ":")))
            log(f"fan-out: nginx+nchan (worker pid {stack.ng_worker}), message {result['message_bytes']} bytes")
            result["rows"] += _sweep("nchan", ns, updates, procs, pool, f"ws://127.0.0.1:{stack.ng_port}/sub",
                                     stack.ng_worker, publish_ng, subs_ng, None, rate)
    if save:
        save_result("fanout", result)
    return result
