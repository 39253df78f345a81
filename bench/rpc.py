"""/rpc: what the proxy saves the provider (issue 12).

(a) N WebSocket clients each ``accountSubscribe`` to the pot through /rpc: upstream
    subscriptions (goal: 1) and notification-to-last-client latency, next to the same N
    clients on /ws (one state frame).
(b) W wallets each polling getSignatureStatuses for their own signature: upstream calls
    per poll (goal: <= 1 per 256 signatures), next to the same load sent straight to the
    simulator.
(c) N simulated frontends, each polling its own wallet's getBalance, getLatestBlockhash
    and getSlot every 3-7 s: upstream calls/s at the simulator for each N (goal: flat in
    N for blockhash and slot; the distinct balances merge into getMultipleAccounts of
    <= 100 keys), next to the same load sent straight to the simulator, same run.

The server runs in its own process (pinned to the server core), the WebSocket load client
in another (bench/rpcclient.py), (b)'s HTTP load from this one; all on loopback, bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from .common import CLIENT_CPUS, COMMAND, ROOT, AddressPool, Procs, load_results, log, machine, python, save_result
from .stack import Stack

# The load clients come from one address: no per-client budget.
_CONFIG = """[rpc]
per_client_rps = 0
[ws]
ping_interval = 60.0
"""


def start(stack: Stack, env: dict[str, str] | None = None) -> None:
    """Simulator, then edgestate with the bench config.

    The upstream rate limit is raised to a paid plan's 200/s (environment: the stack's
    file already has an [upstream] table) so that (c) shows what the proxy asks for,
    not what Helius Free's 10/s lets through.
    """
    stack.start_sim()
    env = {"EDGESTATE_UPSTREAM_MAX_REQUESTS_PER_SECOND": "200", **(env or {})}
    os.environ.update(env)
    try:
        stack.start_edgestate(_CONFIG)
    finally:
        for name in env:
            del os.environ[name]


def _ws_clients(stack: Stack, pool: AddressPool, n: int, path: str) -> dict[str, Any]:
    sources = ",".join(pool.take(n))
    argv = ["taskset", "-c", CLIENT_CPUS, python(), "-m", "bench.rpcclient", "subscribe", stack.es, stack.sim,
            str(n), path, sources]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rpcclient failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_calls(stack: Stack, target: str, wallets: int, polls: int) -> dict[str, Any]:
    argv = ["taskset", "-c", CLIENT_CPUS, python(), "-m", "bench.rpcclient", "statuses", target, stack.sim,
            str(wallets), str(polls)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=polls + 180, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rpcclient statuses failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _readmix(stack: Stack, target: str, n: int, warmup: float, measure: float) -> dict[str, Any]:
    argv = ["taskset", "-c", CLIENT_CPUS, python(), "-m", "bench.rpcclient", "readmix", target, stack.sim,
            str(n), str(warmup), str(measure)]
    if target.startswith(stack.es):
        argv.append(stack.es)
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=warmup + measure + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rpcclient readmix failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_readmix(stack: Stack, frontends: list[int], warmup: float, measure: float) -> dict[str, Any]:
    """(c): the read mix through /rpc and straight to the simulator, for each N, plus an idle line."""
    out: dict[str, Any] = {"warmup_s": warmup, "measure_s": measure, "period_s": [3.0, 7.0], "rows": []}
    log("rpc (c): idle edgestate (its own refresher only)")
    out["idle"] = _readmix(stack, stack.es + "/rpc", 0, 2.0, measure)
    for n in frontends:
        for name, target in (("edgestate", stack.es + "/rpc"), ("direct", stack.sim + "/")):
            log(f"rpc (c): {n} frontends -> {name}")
            row = {"target": name, **_readmix(stack, target, n, warmup, measure)}
            log(f"  {row}")
            out["rows"].append(row)
    return out


def run(ns: list[int], wallets: int = 1000, polls: int = 3, *, frontends: tuple[int, ...] = (100, 1000, 10000),
        warmup: float = 10.0, measure: float = 20.0, only: str = "abc") -> dict[str, Any]:
    """Run (a) for each N, (b) once and (c) for each frontend count; save bench/results/rpc.json.

    ``only`` picks scenarios ("c" runs only the read mix; the results file keeps the others' last figures).
    """
    results: dict[str, Any] = {"machine": machine(), "subscriptions": [], "statuses": {}}
    if only != "abc":  # keep the other parts' last figures, each with the command and machine that made it
        prev = load_results().get("rpc", {})
        made = {"command": prev.get("command"), "machine": prev.get("machine")}
        results = {**prev, "machine": machine(), "parts": prev.get("parts") or {"a": made, "b": made}}
        results.pop("command", None)
    for part in only:
        results.setdefault("parts", {})[part] = {"command": COMMAND[0], "machine": machine()}
    with Procs() as procs:
        stack = Stack(procs)
        start(stack)
        pool = AddressPool()
        if "c" in only:
            results["readmix"] = run_readmix(stack, list(frontends), warmup, measure)
            save_result("rpc", results)
        for n in ns if "a" in only else ():
            for path in ("/ws", "/rpc"):
                log(f"rpc (a): {n} clients on {path}")
                row = _ws_clients(stack, pool, n, path)
                log(f"  {row}")
                results["subscriptions"].append(row)
                time.sleep(5.0)  # let the last round's sockets close (open-files limit)
        if "b" in only:
            save_result("rpc", results)
            log(f"rpc (b): {wallets} wallets x {polls} polls of getSignatureStatuses")
            results["statuses"]["edgestate"] = _status_calls(stack, stack.es + "/rpc", wallets, polls)
            results["statuses"]["direct"] = _status_calls(stack, stack.sim + "/", wallets, polls)
            # The before line: the same load with the merge window of the previous code (the
            # pool's batch window, 100 ms), on a second stack started the same way.
            old = Stack(procs)
            start(old, {"EDGESTATE_RPC_STATUS_WINDOW_MS": "100"})
            results["statuses"]["edgestate_100ms"] = _status_calls(old, old.es + "/rpc", wallets, polls)
            log(f"  {results['statuses']}")
    save_result("rpc", results)
    return results
