"""HTTP: wrk on GET /api/state and /api/price/<mint> (edgestate), the same bytes from a file
(nginx), and edgestate behind nginx proxy_cache; upstream calls/s at the simulator meanwhile."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from typing import Any

from .common import (
    CLIENT_CPUS,
    NCPU,
    ROOT,
    SERVER_CPUS,
    Procs,
    cpu_s,
    free_port,
    log,
    machine,
    python,
    save_result,
    wait_http,
)
from .stack import Stack

TOKEN_MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"  # config.toml's default token.mint


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def wrk(url: str, duration: int, threads: int = 2, conns: int = 64) -> dict[str, Any]:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", url]
    if NCPU > 1:
        argv = ["taskset", "-c", CLIENT_CPUS, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "command": " ".join(argv[3:] if NCPU > 1 else argv),
        "rps": float(rps.group(1)) if rps else None,
        "p50_ms": _ms(p50.group(1)) if p50 else None,
        "p99_ms": _ms(p99.group(1)) if p99 else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def _upstream(stack: Stack) -> tuple[int, int]:
    c = stack.sim_counters()
    return c["rpc_calls"], c["price_requests"]


def _measure(stack: Stack, name: str, url: str, duration: int, pid: int) -> dict[str, Any]:
    rpc0, price0 = _upstream(stack)
    api0 = stack.es_stats()["api"]["requests"]
    cpu0, t0 = cpu_s(pid), time.monotonic()
    r = wrk(url, duration)
    dt = time.monotonic() - t0
    cpu1 = cpu_s(pid)
    rpc1, price1 = _upstream(stack)
    api1 = stack.es_stats()["api"]["requests"]
    r.update({
        "target": name,
        "url_path": url.split("/", 3)[-1],
        "upstream_rpc_per_s": round((rpc1 - rpc0) / dt, 2),
        "upstream_price_per_s": round((price1 - price0) / dt, 2),
        "origin_requests_per_s": round((api1 - api0 - 1) / dt, 2),  # minus the harness's own /stats
        "server_cpu_pct": round((cpu1 - cpu0) / dt * 100, 1),
    })
    log(f"  {name}: {r['rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, upstream "
        f"{r['upstream_rpc_per_s']} rpc/s + {r['upstream_price_per_s']} price/s, origin {r['origin_requests_per_s']} req/s")
    return r


def run(duration: int = 10, with_nginx: bool = True) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "duration_s": duration, "rows": []}
    with Procs() as procs:
        stack = Stack(procs)
        stack.start_edgestate()
        body = urllib.request.urlopen(stack.es + "/api/state", timeout=5).read()
        result["body_bytes"] = len(body)
        if with_nginx:
            stack.start_nginx(static_body=body, proxy_cache=True)
        urllib.request.urlopen(f"{stack.es}/api/price/{TOKEN_MINT}", timeout=10).read()  # warm the cache
        # Idle baseline: what the server asks upstream with no HTTP load at all.
        rpc0, price0 = _upstream(stack)
        time.sleep(duration)
        rpc1, price1 = _upstream(stack)
        result["idle"] = {"upstream_rpc_per_s": round((rpc1 - rpc0) / duration, 2),
                          "upstream_price_per_s": round((price1 - price0) / duration, 2)}
        log(f"http: idle upstream {result['idle']}")
        es, ng = stack.es, stack.ng
        # Baseline in the same run: a bare ASGI callable on Hypercorn's trio worker, same bytes.
        body_file = stack.dir / "state.json"
        body_file.write_bytes(body)
        bare_port = free_port()
        bare = procs.start("bare-asgi", [python(), "-m", "bench.bare_asgi", f"127.0.0.1:{bare_port}"],
                           cpus=SERVER_CPUS, env={"BENCH_BODY_FILE": str(body_file), "PYTHONPATH": str(ROOT)})
        wait_http(f"http://127.0.0.1:{bare_port}/")
        result["rows"].append(_measure(stack, "bare ASGI on Hypercorn trio (same bytes)", f"http://127.0.0.1:{bare_port}/api/state",
                                       duration, bare.pid))
        procs.stop(bare)
        result["rows"].append(_measure(stack, "edgestate GET /api/state", es + "/api/state", duration, stack.es_pid))
        result["rows"].append(_measure(stack, "edgestate GET /api/price/<mint>", f"{es}/api/price/{TOKEN_MINT}",
                                       duration, stack.es_pid))
        if not with_nginx:
            log("http: nginx unavailable: static-file and proxy_cache rows skipped")
        else:
          result["rows"].append(_measure(stack, "nginx static file (same bytes)", ng + "/static/state.json", duration,
                                       stack.ng_worker))
          result["rows"].append(_measure(stack, "nginx proxy_cache -> edgestate /api/state", ng + "/api/state", duration,
                                       stack.ng_worker))
    save_result("http", result)
    return result
