"""Attack: a legitimate client's GET /api/state while 3,000 connections hold half-done requests.

One run measures, against edgestate on the server core (attacker and client on the other):
the client's latency alone; the same while 2,000 connections hold half-open request heads,
500 half-open /ws handshakes and 500 partial POST bodies (bench/attacker.py, spread over
source addresses as a botnet would be); the server's CPU and RSS during the hold; and how
long the server took to close the attackers' connections.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import threading
import time
from typing import Any

from .common import (
    CLIENT_CPUS,
    AddressPool,
    Procs,
    cpu_s,
    log,
    machine,
    python,
    rss_kb,
    save_result,
)
from .stack import Stack

_REQUEST = b"GET /api/state HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def _get(port: int, timeout: float = 60.0) -> float:
    """One GET on a new connection, as a browser's first request: seconds to the whole answer."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_REQUEST)
        while s.recv(65536):
            pass
    return time.perf_counter() - t


def _latencies(port: int, n: int, gap: float = 0.01) -> dict[str, Any]:
    samples, errors = [], 0
    for _ in range(n):
        try:
            samples.append(_get(port))
        except OSError:
            errors += 1
        time.sleep(gap)
    samples.sort()
    pct = (lambda p: round(samples[min(len(samples) - 1, int(p * len(samples)))] * 1000, 2)) if samples else (
        lambda p: None)
    return {"n": len(samples), "errors": errors, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": round(samples[-1] * 1000, 2) if samples else None}


def run(heads: int = 2000, ws: int = 500, bodies: int = 500, requests: int = 200,
        hold_limit: float = 45.0, settle: float = 1.5) -> dict[str, Any]:
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate()
        port, pid = stack.es_port, stack.es_pid
        cpu_a, w_a = cpu_s(pid), time.monotonic()
        alone = _latencies(port, requests)
        alone["server_cpu_pct"] = round(100 * (cpu_s(pid) - cpu_a) / (time.monotonic() - w_a), 1)
        log(f"attack: alone p50 {alone['p50_ms']} ms p99 {alone['p99_ms']} ms, server CPU {alone['server_cpu_pct']}%")
        # Ten source addresses (300 connections each, under the per-client cap), like a botnet.
        addrs = AddressPool().take(10 * AddressPool.PER_ADDR)
        attacker = procs.start("attacker", [python(), "-m", "bench.attacker", "--port", str(port),
                                            "--addrs", ",".join(addrs), "--heads", str(heads), "--ws", str(ws),
                                            "--bodies", str(bodies), "--hold", str(hold_limit)],
                               cpus=CLIENT_CPUS, stdout_pipe=True)
        assert attacker.stdout is not None
        opened = json.loads(attacker.stdout.readline() or "{}")
        t_open = time.monotonic()
        log(f"attack: {opened}")
        time.sleep(settle)  # the accepts themselves are done; what does holding them cost?
        cpu0, w0 = cpu_s(pid), time.monotonic()
        rss0 = rss_kb(pid)
        under = _latencies(port, requests)
        cpu1, w1 = cpu_s(pid), time.monotonic()
        rss1 = rss_kb(pid)
        log(f"attack: under attack p50 {under['p50_ms']} ms p99 {under['p99_ms']} ms, "
            f"server CPU {100 * (cpu1 - cpu0) / (w1 - w0):.1f}% of a core")
        done: dict[str, Any] = {}

        def wait_done() -> None:
            line = attacker.stdout.readline() if attacker.stdout else ""
            done.update(json.loads(line) if line else {})

        waiter = threading.Thread(target=wait_done, daemon=True)
        waiter.start()
        waiter.join(hold_limit + 10)
        try:
            attacker.wait(5)
        except subprocess.TimeoutExpired:
            procs.stop(attacker)
        close_s = done.get("close_s", [])
        still_open = done.get("opened", 0) - done.get("closed", 0)
        result = {
            "machine": machine(),
            "attack": {"settle_s": settle, "heads": heads, "ws_handshakes": ws, "post_bodies": bodies, "opened": opened.get("opened"),
                       "connect_failed": opened.get("failed"), "hold_limit_s": hold_limit},
            "alone": alone,
            "under_attack": under,
            "p99_ratio": round(under["p99_ms"] / alone["p99_ms"], 2) if under["p99_ms"] and alone["p99_ms"] else None,
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / (w1 - w0), 1),
            "server_rss_mb": {"before": round(rss0 / 1024, 1), "during": round(rss1 / 1024, 1)},
            "closed_by_server": done.get("closed"),
            "still_open_at_limit": still_open,
            "close_s": {"p50": statistics.median(close_s) if close_s else None,
                        "max": max(close_s) if close_s else None},
            "seconds_from_open_to_end": round(time.monotonic() - t_open, 1),
        }
        log(f"attack: closed {result['closed_by_server']}, still open at the limit {still_open}, "
            f"close p50 {result['close_s']['p50']} s max {result['close_s']['max']} s")
        save_result("attack", result)
        return result
