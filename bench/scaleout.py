"""Scale-out (issue 7): many clients on one machine with ``--workers``, and a root with children.

workers: ``edgestate serve --workers W`` (a supervisor, one upstream-facing feed process and
W workers sharing the port); N clients are connected through the shared port, then
``updates`` jackpot changes are made at the simulator. Reported: delivery latency
(p50/p99/last) from the upstream change, missing updates, RSS per connection and CPU per
broadcast summed over every process of the group, and the provider's JSON-RPC calls/s
during the window (the figure that must not move with N).

tree: the provider's calls/s over the same window for one node alone, then for a root
with 3 children (``upstream.parent``) each holding clients: the children add nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    SERVER_CPUS,
    AddressPool,
    Procs,
    cpu_s,
    free_port,
    http,
    log,
    machine,
    python,
    rss_kb,
    save_result,
    wait_http,
)
from .fanout import _analyse
from .stack import KeepAlive, LoadClients, Stack, nchan_publisher

BASE_LAMPORTS = 11_000_000_000


def _group_pids(supervisor: int) -> list[int]:
    # The supervisor may spawn from any of its threads: collect every thread's children.
    kids: list[int] = []
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        kids += children_of_task(supervisor, int(task.name))
    return [supervisor, *kids]


def children_of_task(pid: int, tid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        return []


def _config(stack: Stack, path: Path, port: int, extra_server: str = "", extra_upstream: str = "") -> Path:
    path.write_text(
        f"""[server]
bind = "127.0.0.1:{port}"
max_connections_per_client = 0
{extra_server}
[upstream]
{extra_upstream}
rpc_url = ["http://127.0.0.1:{stack.sim_port}"]
ws_url = "ws://127.0.0.1:{stack.sim_port}"
[price]
url = "http://127.0.0.1:{stack.sim_port}/price/v3"
[ws]
ping_interval = 120.0
[log]
level = "warning"
"""
    )
    return path


def _rpc_calls(stack: Stack) -> int:
    """What the providers count: JSON-RPC calls (batch items one by one) + price API requests."""
    c = stack.sim_counters()
    return int(c["rpc_calls"]) + int(c["price_requests"])


def _sweep(name: str, ns: list[int], ws_url: str, pids: Callable[[], list[int]], publish: Callable[[int], float],
           stack: Stack, procs: Procs, pool: AddressPool, rate: float, updates: int,
           label: dict[str, Any]) -> list[dict[str, Any]]:
    """Top the clients up to each N, make ``updates`` changes, measure the group ``pids()``."""
    rows: list[dict[str, Any]] = []
    rss_idle = sum(rss_kb(p) for p in pids())
    clients = LoadClients(procs, pool, name=f"lc-{name}")
    connected, seq = 0, 0
    try:
        for n in ns:
            t_conn = time.monotonic()
            clients.add(ws_url, n - connected, rate=rate, per_proc=4500)
            connect_s = time.monotonic() - t_conn
            connected = n
            time.sleep(2.0)
            group = pids()
            rss_n = sum(rss_kb(p) for p in group)
            clients.reset()
            interval = max(0.5, 0.2 + n * 50e-6)
            sent: list[tuple[int, float]] = []
            calls0, cpu0, t0 = _rpc_calls(stack), sum(cpu_s(p) for p in group), time.monotonic()
            for _ in range(updates):
                seq += 1
                lamports = BASE_LAMPORTS + seq * 1_000_003
                sent.append((lamports, publish(lamports)))
                time.sleep(interval)
            window = time.monotonic() - t0
            cpu = sum(cpu_s(p) for p in group) - cpu0
            calls = _rpc_calls(stack) - calls0
            time.sleep(max(2.5, interval))
            a = _analyse(clients.dump(f"{name}-{n}"), sent, n)
            row = {
                "server": name, **label, "n": n, "updates": updates, "interval_s": interval,
                "connect_s": round(connect_s, 1),
                "processes": len(group),
                "rss_idle_mb": round(rss_idle / 1024, 1), "rss_mb": round(rss_n / 1024, 1),
                "rss_per_conn_kb": round((rss_n - rss_idle) / n, 2),
                "cpu_per_broadcast_ms": round(cpu / updates * 1000, 1),
                "cpu_per_client_us": round(cpu / updates / n * 1e6, 2),
                "provider_calls_per_s": round(calls / window, 2),
                **{k: v for k, v in a.items() if k != "client_stats"},
                "clients_open": sum(s["open"] for s in a["client_stats"]),
                "clients_failed": sum(s["failed"] for s in a["client_stats"]),
            }
            rows.append(row)
            log(f"  {name} N={n}: open {row['clients_open']}, missing {row['missing']}, "
                f"p50 {row['p50_ms']} / p99 {row['p99_ms']} / last {row['last_ms_median']} ms, "
                f"{row['rss_per_conn_kb']} KB/conn, {row['cpu_per_client_us']} µs/client, "
                f"provider {row['provider_calls_per_s']} calls/s")
            clients.reset()
    finally:
        clients.close()
    return rows


def run_workers(ns: list[int], workers: int, updates: int = 10, rate: float = 4000.0) -> list[dict[str, Any]]:
    """edgestate --workers W, then nginx+nchan with W workers: same clients, same message."""
    pool = AddressPool()
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_sim()
        port = free_port()
        cfg = _config(stack, stack.dir / "workers.toml", port, f"workers = {workers}")
        sup = procs.start("es-workers", [python(), "-m", "edgestate", "serve", "--config", str(cfg)], cpus=SERVER_CPUS)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/ready", timeout=60)
        time.sleep(2.0)
        sim = KeepAlive("127.0.0.1", stack.sim_port)
        _, state = http("GET", url + "/api/state")

        def publish_es(lamports: int) -> float:
            t = time.time()
            sim.post("/control/jackpot", json.dumps({"lamports": lamports}).encode())
            return t

        rows = _sweep("edgestate", ns, f"ws://127.0.0.1:{port}/ws", lambda: _group_pids(sup.pid), publish_es,
                      stack, procs, pool, rate, updates, {"workers": workers})
        procs.stop(sup)

        stack.start_nginx(nchan=True, workers=workers)
        nginx_master = next(p for name, p in procs.items if name.startswith("nginx-")).pid
        publish_ng = nchan_publisher(stack.ng_port, state)

        publish_ng(BASE_LAMPORTS)
        rows += _sweep("nchan", ns, f"ws://127.0.0.1:{stack.ng_port}/sub", lambda: _group_pids(nginx_master),
                       publish_ng, stack, procs, pool, rate, updates, {"workers": workers})
    return rows


def run_tree(children_n: int = 3, clients_per_child: int = 1000, seconds: float = 30.0) -> dict[str, Any]:
    """Provider calls/s for one node alone, then for a root with ``children_n`` children."""
    pool = AddressPool()
    out: dict[str, Any] = {"children": children_n, "clients_per_child": clients_per_child, "seconds": seconds}
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_sim()
        root_port = free_port()
        cfg = _config(stack, stack.dir / "root.toml", root_port)
        procs.start("es-root", [python(), "-m", "edgestate", "serve", "--config", str(cfg)], cpus=SERVER_CPUS)
        root = f"http://127.0.0.1:{root_port}"
        wait_http(root + "/ready", timeout=30)
        time.sleep(2.0)
        c0 = _rpc_calls(stack)
        time.sleep(seconds)
        out["one_node_calls_per_s"] = round((_rpc_calls(stack) - c0) / seconds, 2)
        kids = []
        clients = LoadClients(procs, pool, name="lc-tree")
        try:
            for i in range(children_n):
                port = free_port()
                path = _config(stack, stack.dir / f"child{i}.toml", port,
                               extra_upstream=f'parent = "ws://127.0.0.1:{root_port}/ws"')
                procs.start(f"es-child{i}", [python(), "-m", "edgestate", "serve", "--config", str(path)], cpus=SERVER_CPUS)
                kids.append(f"http://127.0.0.1:{port}")
            for kid in kids:
                wait_http(kid + "/ready", timeout=30)
                clients.add(kid.replace("http", "ws") + "/ws", clients_per_child, rate=2000)
            time.sleep(2.0)
            c0 = _rpc_calls(stack)
            # Users of every child poll the state meanwhile: answered from the children's memory.
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                for kid in kids:
                    http("GET", kid + "/api/state")
                time.sleep(0.2)
            out["root_plus_children_calls_per_s"] = round((_rpc_calls(stack) - c0) / seconds, 2)
            out["child_feeds"] = [http("GET", kid + "/stats")[1].get("feed", {}).get("connected") for kid in kids]
        finally:
            clients.close()
    log(f"  tree: one node {out['one_node_calls_per_s']} calls/s; root + {children_n} children "
        f"{out['root_plus_children_calls_per_s']} calls/s; children connected {out['child_feeds']}")
    return out


def run(ns: list[int], workers: int, updates: int = 10, rate: float = 4000.0) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "workers_rows": run_workers(ns, workers, updates, rate)}
    result["tree"] = run_tree()
    save_result("scaleout", result)
    return result
