"""/rpc: what the proxy saves the provider (issue 12).

(a) N WebSocket clients each ``accountSubscribe`` to the pot through /rpc: upstream
    subscriptions (goal: 1) and notification-to-last-client latency, next to the same N
    clients on /ws (one state frame).
(b) W wallets each polling getSignatureStatuses for their own signature: upstream calls
    per poll (goal: <= 1 per 256 signatures), next to the same load sent straight to the
    simulator.

The server runs in its own process (pinned to the server core), the WebSocket load client
in another (bench/rpcclient.py), (b)'s HTTP load from this one; all on loopback, bounded.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from typing import Any

import httpx
import trio
from solders.signature import Signature

from .common import CLIENT_CPUS, ROOT, AddressPool, Procs, log, machine, python, save_result
from .stack import Stack

_CONFIG = """[rpc]
per_client_rps = 0
[ws]
ping_interval = 60.0
"""


def _ws_clients(stack: Stack, pool: AddressPool, n: int, path: str) -> dict[str, Any]:
    sources = ",".join(pool.take(n))
    argv = ["taskset", "-c", CLIENT_CPUS, python(), "-m", "bench.rpcclient", "subscribe", stack.es, stack.sim,
            str(n), path, sources]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rpcclient failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def _statuses(target: str, wallets: int, polls: int, interval: float) -> tuple[float, int]:
    sigs = [str(Signature(os.urandom(64))) for _ in range(wallets)]
    limits = httpx.Limits(max_connections=100)
    errors = 0

    async def poll(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal errors
        try:
            resp = await http.post(target, json=body)
            errors += "result" not in resp.json()
        except (httpx.HTTPError, ValueError):
            errors += 1

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30, pool=None)) as http:
        t0 = time.monotonic()
        with trio.fail_after(120):
            for _ in range(polls):
                started = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for s in sigs:
                        body = {"jsonrpc": "2.0", "id": 1, "method": "getSignatureStatuses", "params": [[s]]}
                        nursery.start_soon(functools.partial(poll, http, body))
                await trio.sleep(max(0.0, interval - (trio.current_time() - started)))
        return time.monotonic() - t0, errors


def _status_calls(stack: Stack, target: str, wallets: int, polls: int, interval: float) -> dict[str, Any]:
    before = stack.sim_counters()["rpc_methods"].get("getSignatureStatuses", 0)
    took, errors = trio.run(_statuses, target, wallets, polls, interval)
    after = stack.sim_counters()["rpc_methods"].get("getSignatureStatuses", 0)
    return {"wallets": wallets, "polls": polls, "upstream_calls": after - before, "client_errors": errors,
            "calls_per_poll": round((after - before) / polls, 2), "seconds": round(took, 1)}


def run(ns: list[int], wallets: int = 1000, polls: int = 3) -> dict[str, Any]:
    """Run (a) for each N and (b) once; save bench/results/rpc.json."""
    results: dict[str, Any] = {"machine": machine(), "subscriptions": [], "statuses": {}}
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate(_CONFIG)
        pool = AddressPool()
        for n in ns:
            for path in ("/ws", "/rpc"):
                log(f"rpc (a): {n} clients on {path}")
                row = _ws_clients(stack, pool, n, path)
                log(f"  {row}")
                results["subscriptions"].append(row)
                time.sleep(5.0)  # let the last round's sockets close (open-files limit)
        save_result("rpc", results)
        log(f"rpc (b): {wallets} wallets x {polls} polls of getSignatureStatuses")
        results["statuses"]["edgestate"] = _status_calls(stack, stack.es + "/rpc", wallets, polls, 1.0)
        results["statuses"]["direct"] = _status_calls(stack, stack.sim + "/", wallets, polls, 1.0)
        log(f"  {results['statuses']}")
    save_result("rpc", results)
    return results
