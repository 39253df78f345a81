"""docs/benchmarks.md and docs/img/*.png from bench/results/*.json (real runs only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import DOCS, IMG, ROOT, load_results, machine_line


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:  # nan
            return "–"
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    try:
        return f"{a / b:.2f}x"
    except (TypeError, ZeroDivisionError):
        return "–"


def _footer(fig: Any, res: dict[str, Any]) -> None:
    m = res["machine"]
    fig.text(0.01, 0.005, f"{res.get('command', 'python -m bench')}  ·  {machine_line(m)}", fontsize=7, color="#555")


def _kfmt() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0")


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


# ------------------------------------------------------------------ fan-out
def fanout_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res["rows"]
    es = {r["n"]: r for r in rows if r["server"] == "edgestate"}
    ng = {r["n"]: r for r in rows if r["server"] == "nchan"}
    ns = sorted(es)
    out = [
        "## Fan-out: N WebSocket clients on one process, edgestate vs nginx+nchan",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · "
        f"{res['updates']} state changes per N, message {res.get('message_bytes', '?')} bytes "
        "(the same `stateUpdate` JSON for both servers) · server pinned to core 0, Node `ws` load client "
        "processes (≤ 4,500 connections per source address, 127.x.y.z) pinned to core 1.",
        "",
        "Latency runs from the wall clock just before the change is made (edgestate: `POST /control/jackpot` "
        "at the simulator, which pushes the account change over PubSub to edgestate; nchan: the `POST` of the "
        "message to nchan's publisher location) to the receipt of the frame carrying that value, for every "
        "client and update. *last* = the slowest client of an update (median over the updates / worst). "
        "CPU = utime+stime of the server process (nginx: its one worker) over the updates' window ÷ updates "
        "(includes whatever else the server did meanwhile: pollers, timers). RSS/conn = (VmRSS with N − VmRSS "
        "before any client) / N.",
        "",
        "| N | server | CPU/broadcast | CPU/client/broadcast | RSS/conn | p50 | p99 | last (median / worst) | missing | connect rate |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ns:
        for r in (es.get(n), ng.get(n)):
            if not r:
                continue
            out.append(
                f"| {n:,} | {r['server']} | {_fmt(r['cpu_per_broadcast_ms'])} ms | {_fmt(r['cpu_per_client_us'])} µs | "
                f"{_fmt(r['rss_per_conn_kb'])} KB | {_fmt(r['p50_ms'])} ms | {_fmt(r['p99_ms'])} ms | "
                f"{_fmt(r['last_ms_median'])} / {_fmt(r['last_ms_max'])} ms | {r['missing']:,} of {r['expected']:,} | "
                f"{_fmt(r.get('connect_rate'), 0)}/s |"
            )
    if ng:
        out += ["", "Ratios edgestate / nchan (same run; < 1 means edgestate is cheaper/faster):", "",
                "| N | CPU per client | RSS per connection | last-client latency (median) | p99 |",
                "|---:|---:|---:|---:|---:|"]
        for n in ns:
            if n in ng:
                a, b = es[n], ng[n]
                out.append(f"| {n:,} | {_ratio(a['cpu_per_client_us'], b['cpu_per_client_us'])} | "
                           f"{_ratio(a['rss_per_conn_kb'], b['rss_per_conn_kb'])} | "
                           f"{_ratio(a['last_ms_median'], b['last_ms_median'])} | {_ratio(a['p99_ms'], b['p99_ms'])} |")
    selfrep = [r for r in es.values() if r.get("server_stats")]
    if selfrep:
        out += ["", "edgestate's own view (`/stats` broadcaster after the last update of each N): "
                + "; ".join(f"N={r['n']:,}: fan-out loop {r['server_stats'].get('last_broadcast_ms')} ms wall / "
                            f"{r['server_stats'].get('last_broadcast_cpu_ms')} ms CPU, conflated "
                            f"{r['server_stats'].get('conflated')}, slow closed {r['server_stats'].get('slow_clients_closed')}"
                            for r in sorted(selfrep, key=lambda r: r["n"])) + "."]
    if plt:
        fig, ax = plt.subplots(1, 3, figsize=(13, 4.2))
        for name, d, style, color in (("edgestate", es, "o-", "#1f77b4"), ("nginx+nchan", ng, "s--", "#ff7f0e")):
            if not d:
                continue
            xs = sorted(d)
            ax[0].plot(xs, [d[n]["cpu_per_client_us"] for n in xs], style, color=color, label=name)
            ax[1].plot(xs, [d[n]["rss_per_conn_kb"] for n in xs], style, color=color, label=name)
            ax[2].plot(xs, [d[n]["last_ms_median"] for n in xs], style, color=color, label=f"{name} last client (median)")
            ax[2].plot(xs, [d[n]["p50_ms"] for n in xs], style, color=color, alpha=0.35, label=f"{name} p50")
        ax[0].set(title="server CPU per client per broadcast", xlabel="clients", ylabel="µs")
        ax[1].set(title="server RSS per connection", xlabel="clients", ylabel="KB")
        ax[2].set(title="delivery latency from upstream change", xlabel="clients", ylabel="ms")
        for a in ax:
            a.grid(alpha=0.3)
            a.set_ylim(bottom=0)
            a.xaxis.set_major_formatter(_kfmt())
            a.legend(fontsize=8)
        fig.suptitle("Fan-out on one process: edgestate vs nginx+nchan (same client, same message)")
        _footer(fig, res)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(IMG / "fanout.png", dpi=100)
        plt.close(fig)
        out += ["", "![fan-out](img/fanout.png)"]
    return out


# ------------------------------------------------------------------ HTTP
def http_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res["rows"]
    out = [
        "## HTTP: GET /api/state",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · each row `wrk -t2 -c64 "
        f"-d{res['duration_s']}s --latency` pinned to core 1, servers on core 0 · body {res.get('body_bytes')} bytes. "
        "Upstream calls/s = the simulator's JSON-RPC calls and price requests per second during the run; "
        f"with no HTTP load at all they were {res['idle']['upstream_rpc_per_s']} RPC calls/s + "
        f"{res['idle']['upstream_price_per_s']} price requests/s. Origin req/s = edgestate's `/stats` "
        "`api.requests` delta (what reached edgestate).",
        "",
        "| target | req/s | p50 | p99 | upstream RPC calls/s | upstream price req/s | origin req/s | server CPU | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['target']} | {_fmt(r['rps'], 0)} | {_fmt(r['p50_ms'], 2)} ms | {_fmt(r['p99_ms'], 2)} ms | "
                   f"{_fmt(r['upstream_rpc_per_s'], 2)} | {_fmt(r['upstream_price_per_s'], 2)} | "
                   f"{_fmt(r['origin_requests_per_s'], 1)} | {_fmt(r['server_cpu_pct'])} % | {r['non_2xx']} |")
    es = next((r for r in rows if r["target"].startswith("edgestate GET /api/state")), None)
    st = next((r for r in rows if r["target"].startswith("nginx static")), None)
    bare = next((r for r in rows if r["target"].startswith("bare ASGI")), None)
    if es and bare:
        out += ["", f"edgestate / bare ASGI on Hypercorn (same run): {_ratio(es['rps'], bare['rps'])} the requests/s, "
                f"{_ratio(es['p99_ms'], bare['p99_ms'])} the p99."]
    if es and st:
        out += ["", f"edgestate / nginx static file: {_ratio(es['rps'], st['rps'])} the requests/s, "
                f"{_ratio(es['p99_ms'], st['p99_ms'])} the p99."]
    if plt and rows:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
        labels = [r["target"].replace(" -> ", "\n→ ").replace(" (", "\n(") for r in rows]
        ax[0].barh(labels, [r["rps"] or 0 for r in rows], color="#4c72b0")
        ax[0].set(title="requests/s (wrk -t2 -c64)", xlabel="req/s")
        ax[1].barh(labels, [r["p99_ms"] or 0 for r in rows], color="#dd8452", label="p99")
        ax[1].barh(labels, [r["p50_ms"] or 0 for r in rows], color="#55a868", label="p50")
        ax[1].set(title="latency", xlabel="ms")
        ax[1].legend(fontsize=8)
        for a in ax:
            a.invert_yaxis()
            a.tick_params(axis="y", labelsize=7)
            a.grid(alpha=0.3, axis="x")
        fig.suptitle("HTTP GET /api/state: edgestate vs nginx (same bytes)")
        _footer(fig, res)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(IMG / "http.png", dpi=100)
        plt.close(fig)
        out += ["", "![http](img/http.png)"]
    return out


# ------------------------------------------------------------------ attack
def _attack_rows(res: dict[str, Any], label: str) -> list[str]:
    a, u = res["alone"], res["under_attack"]
    return [
        f"| {label} | {_fmt(a['p50_ms'], 2)} / {_fmt(a['p99_ms'], 2)} ms | {_fmt(u['p50_ms'], 2)} / "
        f"{_fmt(u['p99_ms'], 2)} ms | {_fmt(res.get('p99_ratio'), 2)}x | {_fmt(a.get('server_cpu_pct'))} % | "
        f"{_fmt(res['server_cpu_pct'])} % | {_fmt(res['server_rss_mb']['before'])} → "
        f"{_fmt(res['server_rss_mb']['during'])} MB | {_fmt(res['closed_by_server'])} of {_fmt(res['attack']['opened'])}"
        f" | {_fmt(res['close_s']['p50'])} / {_fmt(res['close_s']['max'])} s |"
    ]


def attack_section(res: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    at = res["attack"]
    out = [
        "## Attack: a legitimate client while 3,000 connections hold half-done requests",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · server on core 0, the "
        f"attacker (bench/attacker.py) and the client on core 1. The attacker opens {at['heads']:,} connections "
        f"that send half a request head, {at['ws_handshakes']:,} half /ws handshakes and {at['post_bodies']:,} "
        "POSTs that announce 60,000 body bytes and send 13, from ten loopback addresses, then sends nothing. The "
        "client makes 200 GET /api/state, each on a new connection, alone and during the hold (measured "
        f"{at.get('settle_s', 0)} s after the last attacker connection opened). Server CPU is its CPU time over "
        f"the client's window. Connections the server had not closed after {at['hold_limit_s']:g} s count as "
        "never closed.",
        "",
        "| code | client p50 / p99 alone | under attack | p99 ratio | server CPU alone | during hold | server RSS |"
        " closed by the server | time to close p50 / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if before:
        out += _attack_rows(before, "before (" + str(before.get("baseline", "baseline")) + ")")
    out += _attack_rows(res, "this code")
    return out


def parse_section(res: dict[str, Any]) -> list[str]:
    out = ["## Head parsing: llhttp vs h11", "",
           f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · one {res['head_bytes']}-byte "
           "browser-like GET head, best of 5 × "
           f"{res['number']:,}. Why heads.py uses llhttp (httptools): the in-memory routes spend ~100 µs of CPU "
           "per request in all, so h11's cost would show directly in their requests/s.", "",
           "| parser | µs per head |", "|---|---:|"]
    out += [f"| {r['parser']} | {_fmt(r['us_per_head'], 2)} |" for r in res["rows"]]
    return out


def before_after_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """Scenarios run with --baseline: today's code and this code, back to back in one run."""
    out = ["## Before / after (`--baseline`: the same scenario against the previous code, same run)", ""]
    http_b, http_a = results.get("http-baseline"), results.get("http")
    if http_b and http_a:
        out += [f"HTTP, `{http_a.get('command')}` · {machine_line(http_a['machine'])}:", "",
                "The bare ASGI and nginx rows run the same code in both halves: their ratios show the run's own "
                "noise on this shared machine; repeat the command and compare the edgestate rows against them.", "",
                "| target | before req/s | after req/s | ratio | before p99 | after p99 |", "|---|---:|---:|---:|---:|---:|"]
        before = {r["target"]: r for r in http_b["rows"]}
        for r in http_a["rows"]:
            b = before.get(r["target"])
            if b:
                out.append(f"| {r['target']} | {_fmt(b['rps'], 0)} | {_fmt(r['rps'], 0)} | {_ratio(r['rps'], b['rps'])} "
                           f"| {_fmt(b['p99_ms'], 2)} ms | {_fmt(r['p99_ms'], 2)} ms |")
        out.append("")
    fan_b, fan_a = results.get("fanout-baseline"), results.get("fanout")
    if fan_b and fan_a:
        out += [f"Fan-out, `{fan_a.get('command')}` · {machine_line(fan_a['machine'])}; each relative to nginx+nchan "
                "measured in the same scenario run:", "",
                "| N | CPU/client vs nchan before | after | RSS/conn vs nchan before | after | missing before / after |",
                "|---:|---:|---:|---:|---:|---:|"]

        def rel(res: dict[str, Any]) -> dict[int, tuple[Any, Any, Any]]:
            es = {r["n"]: r for r in res["rows"] if r["server"] == "edgestate"}
            ng = {r["n"]: r for r in res["rows"] if r["server"] == "nchan"}
            return {n: (_ratio(es[n].get("cpu_per_client_us"), ng.get(n, {}).get("cpu_per_client_us")),
                        _ratio(es[n].get("rss_per_conn_kb"), ng.get(n, {}).get("rss_per_conn_kb")),
                        es[n].get("missing")) for n in es}

        rb, ra = rel(fan_b), rel(fan_a)
        for n in sorted(ra):
            if n in rb:
                out.append(f"| {n:,} | {rb[n][0]} | {ra[n][0]} | {rb[n][1]} | {ra[n][1]} | {_fmt(rb[n][2])} / "
                           f"{_fmt(ra[n][2])} |")
        out.append("")
    if len(out) == 2:
        out += ["Not run yet: `python -m bench http --baseline PATH` (PATH: a checkout of the previous code).", ""]
    return out


# ------------------------------------------------------------------ amplification
def amplification_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res["rows"]
    out = [
        "## Upstream amplification: users → edgestate → provider",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · each user holds a "
        f"WebSocket to edgestate and polls `GET /api/state` every {res['poll_period_s']:.0f} s through nginx "
        f"`proxy_cache` (kept as a rate, users/{res['poll_period_s']:.0f} per second, over a "
        f"{res['window_s']:.0f} s window); the jackpot changes every second meanwhile (pushed to every "
        "WebSocket). *Before* = the same pollers sent straight to the provider (JSON-RPC `getBalance`, "
        "`POST /` at the simulator), measured; the simulator's counter then also holds edgestate's own "
        "background calls (~the idle rate of the *after* column).",
        "",
        "| users | polls/s sent | after: reaching edgestate /s | after: upstream calls/s | edgestate CPU | edgestate RSS | before: upstream calls/s | poll p99 (after / before) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a, b = r["after"], r["before"]
        out.append(f"| {r['users']:,} | {_fmt(a['polls_sent_per_s'])} | {_fmt(a['origin_requests_per_s'], 2)} | "
                   f"{_fmt(a['upstream_calls_per_s'], 2)} | {_fmt(a['origin_cpu_pct'])} % | {_fmt(r['edgestate_rss_mb'])} MB | "
                   f"{_fmt(b['upstream_calls_per_s'], 1)} | {_fmt(a['poll_p99_ms'])} / {_fmt(b['poll_p99_ms'])} ms |")
    if plt and rows:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        us = [r["users"] for r in rows]
        ax.plot(us, [r["before"]["upstream_calls_per_s"] for r in rows], "s--", color="#c44e52", label="before: pollers → provider")
        ax.plot(us, [r["after"]["origin_requests_per_s"] for r in rows], "^-", color="#8172b2", label="after: requests reaching edgestate")
        ax.plot(us, [r["after"]["upstream_calls_per_s"] for r in rows], "o-", color="#4c72b0", label="after: edgestate → provider")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(_kfmt())
        ax.set(xlabel="simulated users (WebSocket + poll every 30 s)", ylabel="per second",
               title="Upstream amplification (nginx proxy_cache in front)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _footer(fig, res)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(IMG / "amplification.png", dpi=100)
        plt.close(fig)
        out += ["", "![amplification](img/amplification.png)"]
    return out


# ------------------------------------------------------------------ balances
def balances_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res["rows"]
    out = [
        "## Balances: POST /api/tokens/balances",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · half the wallets hold "
        "an SPL token account of a fresh mint, half none. *cold* = first request for these wallets; *warm* = "
        "the same request repeated 10 times (per-(wallet, mint) cache). Upstream = the simulator's "
        "`rpc_methods` delta (background pollers landing in the window show up too).",
        "",
        "| wallets | funded | cold latency | upstream calls (cold) | warm p50 / max | upstream calls (warm ×10) |",
        "|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        cm = ", ".join(f"{k} {v}" for k, v in sorted(r["cold_methods"].items()) if not k.startswith("("))
        wm = ", ".join(f"{k} {v}" for k, v in sorted(r["warm_methods"].items()) if not k.startswith("(")) or "none"
        out.append(f"| {r['wallets']:,} | {r['funded']:,} | {_fmt(r['cold_ms'])} ms | {cm} | "
                   f"{_fmt(r['warm_p50_ms'])} / {_fmt(r['warm_max_ms'])} ms | {wm} |")
    if plt and rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        ws = [str(r["wallets"]) for r in rows]
        x = range(len(ws))
        ax.bar([i - 0.2 for i in x], [r["cold_ms"] for r in rows], 0.4, label="cold")
        ax.bar([i + 0.2 for i in x], [r["warm_p50_ms"] for r in rows], 0.4, label="warm p50")
        for i, r in enumerate(rows):
            ax.annotate(f"{r['cold_account_calls']} account calls", (i - 0.2, r["cold_ms"]), ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(list(x), ws)
        ax.set(xlabel="wallets per request", ylabel="ms", title="POST /api/tokens/balances")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        _footer(fig, res)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(IMG / "balances.png", dpi=100)
        plt.close(fig)
        out += ["", "![balances](img/balances.png)"]
    return out


# ------------------------------------------------------------------ pool
def pool_section(res: dict[str, Any], plt: Any) -> list[str]:
    out = [
        "## Upstream gateway: the pool's own overhead and the coalescing ratio",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · the simulator in its own "
        "process (core 1, zero latency, no rate limit), the pool in the benchmark process with no rate limit: "
        "N concurrent calls, all awaited. `getSlot` calls carry distinct `minContextSlot`s so none is "
        "deduplicated or merged; distinct `getBalance` calls are merged into `getMultipleAccounts` of 100 keys.",
        "",
        "| calls | method | batch window | max batch | calls/s through the pool | pool CPU per call | HTTP requests | JSON-RPC calls upstream |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["throughput"]:
        out.append(f"| {r['calls']:,} | {r['method']} | {_fmt(r['window_ms'], 0)} ms | {r['max_batch_size']} | "
                   f"{r['calls_per_s']:,} | {_fmt(r['cpu_us_per_call'])} µs | {r['http_requests']:,} | "
                   f"{r['upstream_calls']:,} |")
    c = res.get("coalescing") or {}
    if c:
        out += [
            "",
            f"Coalescing, realistic mix through SolanaRpc + Cache (5 s TTL, single-flight): {c['users']:,} users "
            f"for {_fmt(c['seconds'], 0)} s asking balances (70 % the pot, 20 % one of 50 popular wallets, 10 % a "
            f"random wallet): {c['user_calls']:,} user calls ({_fmt(c['user_calls_per_s'])}/s) cost "
            f"{c['upstream_calls']:,} JSON-RPC calls in {c['upstream_http_requests']:,} HTTP requests "
            f"({_fmt(c['upstream_calls_per_s'], 2)}/s): **{_fmt(c['ratio'])} user calls per upstream call**.",
        ]
    return out


# ------------------------------------------------------------------ cost
def cost_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res["rows"]
    cfg = res.get("config", {})
    out = [
        "## Upstream cost a month: participants pushed vs polled",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · **virtual time**: one process, "
        f"`trio.run` on `MockClock(autojump_threshold=0)`, {res['virtual_hours']:g} h of lottery activity (a "
        f"participant joins every {res['join_every_s']:g} s and adds 0.1 SOL to the pot) in "
        f"{res['real_seconds']:g} s of real time, after a {res['warmup_s']:g} s warm-up; two simulators on loopback "
        "fed the same activity; the default configuration (reconcile every "
        f"{_fmt(cfg.get('participants_reconcile_interval'), 0)} s, price every {_fmt(cfg.get('price_interval'), 0)} s, "
        f"{_fmt(cfg.get('max_requests_per_second'), 0)} req/s) against the same code with participants polled every "
        f"{_fmt(cfg.get('participants_interval'), 0)} s (the design before issue 11). Credits: `upstream.method_costs` "
        "(getProgramAccounts 10, others 1) plus Helius's WebSocket metering (1 credit a connection, 2 per 0.1 MB "
        "streamed), counted by the simulator, projected to 30 days.",
        "",
        "| design | credits/month | of which RPC | of which PubSub | RPC req/s peak | RPC req/s mean | price requests/month | PubSub connections (peak) | join → state (mean / max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['design']} | **{r['credits_per_month']:,}** | {r['rpc_credits_per_month']:,} | "
            f"{r['pubsub_credits_per_month']:,} | {r['rpc_req_per_s_peak']} | {r['rpc_req_per_s_mean']:g} | "
            f"{r['price_requests_per_month']:,} | {r['pubsub_connections_peak']} | "
            f"{_fmt(r['join_latency_s_mean'], 2)} s / {_fmt(r['join_latency_s_max'], 2)} s |"
        )
    goal = res.get("goal_credits_per_month", 50_000)
    out += ["", f"Goal (issue 11): ≤ {goal:,} credits a month at the defaults (5% of Helius Free's 1,000,000): "
                f"**{'met' if res.get('meets_goal') else 'not met'}**. Virtual time measures what is *sent*; "
                "latencies are loopback latencies with no network (a real provider adds its own)."]
    return out


# ------------------------------------------------------------------ scale-out
def scaleout_section(res: dict[str, Any], plt: Any) -> list[str]:
    rows = res.get("workers_rows", [])
    out = [
        "## Scale-out: workers on one machine, and a root with children",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · `edgestate serve --workers W` "
        "(a supervisor, one upstream-facing feed process, W workers sharing the port with SO_REUSEPORT, all on "
        "core 0), then nginx+nchan with W workers (`listen ... reuseport`, core 0) receiving the same message "
        "by HTTP POST; the same Node `ws` clients (≤ 4,500 per process and per source address) on core 1; 10 "
        "changes per N. RSS and CPU are summed over every process of the group. Provider calls/s = the "
        "simulator's JSON-RPC calls + price requests per second during the window (edgestate rows).",
        "",
        "| server | workers | N | open | missing | p50 | p99 | last (median / worst) | RSS/conn | group RSS | CPU/client/broadcast | provider calls/s | connect |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.get('server', 'edgestate')} | {r['workers']} | {r['n']:,} | {r['clients_open']:,} | {r['missing']:,} of {r['expected']:,} | "
            f"{_fmt(r['p50_ms'])} ms | {_fmt(r['p99_ms'])} ms | {_fmt(r['last_ms_median'])} / "
            f"{_fmt(r['last_ms_max'])} ms | {_fmt(r['rss_per_conn_kb'])} KB | {_fmt(r['rss_mb'])} MB | "
            f"{_fmt(r['cpu_per_client_us'])} µs | {_fmt(r['provider_calls_per_s'], 2)} | {_fmt(r['connect_s'])} s |"
        )
    tree = res.get("tree")
    if tree:
        out += [
            "",
            f"Tree: over {_fmt(tree['seconds'], 0)} s the providers saw {_fmt(tree['one_node_calls_per_s'], 2)} "
            f"calls/s from one node alone, and {_fmt(tree['root_plus_children_calls_per_s'], 2)} calls/s from a root "
            f"with {tree['children']} children (`upstream.parent`), each holding {tree['clients_per_child']:,} "
            f"WebSocket clients and polled for /api/state (children connected: {tree['child_feeds']}).",
        ]
    return out


# ------------------------------------------------------------------ soak
def soak_section(res: dict[str, Any], plt: Any) -> list[str]:
    chunks = res["chunks"]
    missing = sum(c["missing"] for c in chunks)
    expected = sum(c["expected"] for c in chunks)
    rss = [s["rss_kb"] for s in res["samples"]]
    out = [
        "## Soak",
        "",
        f"Command: `{res.get('command')}` · machine: {machine_line(res['machine'])} · {res['n']:,} clients, "
        f"{res['minutes']:g} minutes, a state change every {res['period_s']:g} s. RSS from "
        f"{min(rss) / 1024:.1f} to {max(rss) / 1024:.1f} MB (first sample {rss[0] / 1024:.1f}, last "
        f"{rss[-1] / 1024:.1f}); missing deliveries {missing:,} of {expected:,}; worst p99 "
        f"{max(c['p99_ms'] for c in chunks):.1f} ms; slow clients closed "
        f"{chunks[-1]['slow_closed']}; subscribers at the end {chunks[-1]['subscribers']:,}.",
    ]
    if plt and rss:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        ax.plot([s["t_s"] for s in res["samples"]], [v / 1024 for v in rss])
        ax.set(xlabel="seconds", ylabel="edgestate RSS (MB)", title=f"Soak: {res['n']:,} clients, change every {res['period_s']:g} s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        _footer(fig, res)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(IMG / "soak.png", dpi=100)
        plt.close(fig)
        out += ["", "![soak](img/soak.png)"]
    return out


# ------------------------------------------------------------------ expected results
def _rpc_made(res: dict[str, Any], part: str) -> str:
    """"Command: ... · machine: ..." of one part of the rpc results (parts may come from different runs)."""
    made = (res.get("parts") or {}).get(part) or {"command": res.get("command"), "machine": res["machine"]}
    return f"Command: `{made['command']}` · machine: {machine_line(made['machine'])}"


def rpc_section(res: dict[str, Any], plt: Any) -> list[str]:
    out = [
        "## /rpc: shared PubSub subscriptions, merged signature statuses, the read mix",
        "",
        f"(a) {_rpc_made(res, 'a')} · edgestate (core 0) in front "
        "of the simulator; the WebSocket load client is bench/rpcclient.py in its own process (core 1), which "
        "changes the pot once at the simulator and notes when each client receives the new value. On /rpc every "
        "client sent `accountSubscribe(pot)`; on /ws the same clients get the `stateUpdate`.",
        "",
        "| clients | endpoint | upstream subscriptions | client subscriptions | first | p50 | last client | received |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["subscriptions"]:
        up = r["upstream_subscriptions"] if r["path"] == "/rpc" else "(the server's own)"
        subs = f"{r['client_subscriptions']:,}" if r["path"] == "/rpc" else "-"
        out.append(f"| {r['clients']:,} | {r['path']} | {up} | {subs} | {_fmt(r['first_ms'])} ms | "
                   f"{_fmt(r['p50_ms'])} ms | {_fmt(r['last_ms'])} ms | {r['received']:,} |")
    st = res.get("statuses") or {}
    if st and "p50_ms" in st.get("edgestate", {}):
        out += _rpc_statuses(res, st)
    elif st:
        e, d = st["edgestate"], st["direct"]
        out += [
            "",
            f"(b) Signature statuses: {e['wallets']:,} wallets each polling getSignatureStatuses for their own "
            f"signature, {e['polls']} polls a second apart: straight to the simulator {d['upstream_calls']:,} calls "
            f"({_fmt(d['calls_per_poll'])} per poll); through /rpc {e['upstream_calls']:,} upstream calls "
            f"({_fmt(e['calls_per_poll'])} per poll, {e['client_errors']} client errors).",
        ]
    if res.get("readmix"):
        out += _rpc_readmix(res, res["readmix"])
    return out


def _rpc_statuses(res: dict[str, Any], st: dict[str, Any]) -> list[str]:
    e, d, old = st["edgestate"], st["direct"], st.get("edgestate_100ms")
    goal = -(-e["wallets"] // 256)
    out = [
        "",
        f"(b) {_rpc_made(res, 'b')} · {e['wallets']:,} wallets, each polling getSignatureStatuses for its own "
        f"(not yet landed) signature once a second at its own random phase, {e['polls']} rounds, one HTTP request "
        "per poll on the wallet's own keep-alive connection (bench/rpcclient.py `statuses`, core 1). Upstream = "
        "getSignatureStatuses items counted by the simulator. The goal: at most one call per 256 signatures per "
        f"round, here {goal} per round. *wait* = from the poll's due time to its answer.",
        "",
        "| target | upstream calls | per round | signatures per call | wait p50 | p99 | max | took | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("straight to the simulator (before)", d),
            *([("/rpc, previous merge window (100 ms = upstream.batch_window_ms)", old)] if old else []),
            ("/rpc, rpc.status_window_ms = 400 (about a slot)", e)]
    for name, r in rows:
        per_call = r["wallets"] * r["polls"] / r["upstream_calls"] if r["upstream_calls"] else float("nan")
        out.append(f"| {name} | {r['upstream_calls']:,} | {_fmt(r['calls_per_poll'], 2)} | {_fmt(per_call)} | "
                   f"{_fmt(r['p50_ms'])} ms | {_fmt(r['p99_ms'])} ms | {_fmt(r['max_ms'])} ms | {_fmt(r['seconds'])} s | "
                   f"{r['client_errors']} |")
    rate = e["wallets"] * e["polls"] / e["seconds"] if e["seconds"] else float("nan")
    out += [
        "",
        "A merge window opens with the first poll and closes after `rpc.status_window_ms` or at 256 signatures, "
        "so a round costs about max(signatures / 256, the round's spread / window) calls: the 256 are reached "
        f"inside one window once polls arrive at ≥ 640/s. Here the server took the polls at ~{_fmt(rate, 0)}/s "
        f"(all {e['polls']} rounds in {_fmt(e['seconds'])} s, a Quart POST per poll on one shared core), so each "
        "round spread over more than a second; the virtual-time test "
        "`test_polling_wallets_cost_one_status_call_per_256_signatures_per_round` (1,000 wallets at 1,000 polls/s) "
        f"gets ≤ {goal} calls per round, where the 100 ms window of the previous code needed 273 for 3 rounds "
        "(10 ms test window). A poll waits at most the window (+ the upstream reply) for its status.",
    ]
    return out


def _rpc_readmix(res: dict[str, Any], mix: dict[str, Any]) -> list[str]:
    lo, hi = mix["period_s"]
    idle = mix.get("idle", {})
    idle_calls = idle.get("upstream_calls_per_s", 0.0)
    out = [
        "",
        f"(c) {_rpc_made(res, 'c')} · N simulated frontends, each polling its own wallet's `getBalance`, "
        f"`getLatestBlockhash` and `getSlot` (commitment confirmed) every {lo:g}-{hi:g} s (uniform jitter, random "
        f"phase); {mix['warmup_s']:g} s warm-up, then {mix['measure_s']:g} s measured. Load client: "
        "bench/rpcclient.py `readmix` in its own process (core 1, with the simulator): the frontends due within "
        "one 10 ms tick travel together as JSON-RPC batches of ≤ 33 frontends (99 calls) over 16 keep-alive "
        "connections. Browsers would each send their own requests; one Python client could not open 2,000 HTTP "
        "requests/s at N = 10,000 without being the bottleneck, and the proxy answers each batch item on its "
        "own (cache, single-flight, the pool's merging), so the upstream figures are those of calls arriving at "
        "the same times. *before* = the same load sent straight to the simulator, same run. Upstream = calls "
        "(batch items) counted by the simulator per second; the edgestate rows include its own refresher, "
        f"which alone made {_fmt(float(idle_calls), 2)} calls/s (idle line, same run). Upstream limit raised to 200/s "
        "for the run (`EDGESTATE_UPSTREAM_MAX_REQUESTS_PER_SECOND`): the figures are what the proxy asks for.",
        "",
        "| frontends | offered calls/s | delivered (through /rpc) | upstream calls/s through /rpc | getLatestBlockhash "
        "| getSlot | getBalance + getMultipleAccounts | upstream HTTP requests/s | answer p50 / p99 | polls > 1 s late "
        "| before: upstream calls/s straight to the simulator |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    top = ""
    rows = {(r["target"], r["frontends"]): r for r in mix["rows"]}
    for n in sorted({r["frontends"] for r in mix["rows"]}):
        e, d = rows.get(("edgestate", n)), rows.get(("direct", n))
        if e is None:
            continue
        m = e["upstream_by_method"]
        gma = m.get("getMultipleAccounts", 0.0) - idle.get("upstream_by_method", {}).get("getMultipleAccounts", 0.0)
        bal = m.get("getBalance", 0.0) + max(0.0, gma)
        miss = e.get("proxy", {}).get("getBalance", {}).get("cache_misses", 0) / e["seconds"]
        out.append(
            f"| {n:,} | {_fmt(e['offered_calls_per_s'], 0)} | {_fmt(e['client_calls_per_s'], 0)} | "
            f"**{_fmt(e['upstream_calls_per_s'], 2)}** | {_fmt(m.get('getLatestBlockhash', 0.0), 2)} | "
            f"{_fmt(m.get('getSlot', 0.0), 2)} | {_fmt(bal, 2)} ({_fmt(miss, 0)} balances/s missed the cache) | "
            f"{_fmt(e['upstream_http_per_s'], 2)} | {_fmt(e['p50_ms'], 0)} / {_fmt(e['p99_ms'], 0)} ms | "
            f"{e['late_polls']:,} | {_fmt(d['upstream_calls_per_s'], 0) if d else '–'} |")
        top = f"{_fmt(miss / 100, 0)}/s at {n:,} frontends"
    out += [
        "",
        "getLatestBlockhash and getSlot are cached for about a slot (0.4 s) and single-flight: at most one upstream "
        "call per slot-TTL plus the pool's 100 ms window each, whatever N. The balances are distinct keys, one per "
        "wallet, cached for `cache.ttl` (5 s): the misses grow with N and merge into getMultipleAccounts of ≤ 100 "
        "keys per pool window, so that part costs about max(windows/s, misses/s / 100): ~one call per 100 ms "
        f"window once a window holds a miss, then misses/s / 100 (~N / (100 · 6 s)): {top}, "
        "where straight to the provider every balance is a call of its own. *delivered* is what the load client "
        "got answered in the measured window; *late* polls left more than 1 s after their due time because "
        "the server (one core shared with other work) was behind: at the largest N it was at its limit, "
        "catching up on the warm-up's backlog (hence delivered > offered).",
    ]
    return out


def expected_section(results: dict[str, dict[str, Any]]) -> list[str]:
    out = ["## The seed's \"Expected Results\", measured", "",
           "| seed's claim | measured | holds at | source |", "|---|---|---|---|"]
    amp = results.get("amplification")
    if amp and amp["rows"]:
        worst = max(amp["rows"], key=lambda r: r["after"]["upstream_calls_per_s"])
        top = max(r["users"] for r in amp["rows"])
        ok = worst["after"]["upstream_calls_per_s"]
        out.append(f"| upstream API calls < 10 req/s (goal ≤ 1) | at most {ok:.2f} calls/s (vs "
                   f"{max(r['before']['upstream_calls_per_s'] for r in amp['rows']):.0f}/s before) | "
                   f"{'every' if ok <= 1 else 'under 10 at every'} user count measured, up to {top:,} users | amplification |")
    http = results.get("http")
    if http:
        r = next((r for r in http["rows"] if r["target"].startswith("edgestate GET /api/state")), None)
        c = next((r for r in http["rows"] if "proxy_cache" in r["target"]), None)
        if r:
            out.append(f"| response time < 100 ms (cached) | p99 {r['p99_ms']:.1f} ms at {r['rps']:,.0f} req/s direct"
                       + (f"; p99 {c['p99_ms']:.1f} ms behind proxy_cache" if c else "")
                       + " | 64 concurrent connections, wrk (saturating one core: queueing) | http |")
    if amp and amp["rows"]:
        for r in amp["rows"]:
            a = r["after"]
            out.append(f"| response time < 100 ms (cached), realistic load | poll p50 {a['poll_p50_ms']:.1f} ms / p99 "
                       f"{a['poll_p99_ms']:.1f} ms through nginx proxy_cache at {a['polls_sent_per_s']:.0f} polls/s | "
                       f"{r['users']:,} users (WebSocket each, a change every second) | amplification |")
    fan = results.get("fanout")
    soak = results.get("soak")
    es_rows = [r for r in (fan or {}).get("rows", []) if r["server"] == "edgestate"]
    if es_rows:
        top = max(es_rows, key=lambda r: r["n"])
        per = top["rss_per_conn_kb"]
        out.append(f"| memory < 500 MB per instance | {top['rss_kb'] / 1024:.0f} MB RSS with {top['n']:,} clients "
                   f"({per:.1f} KB/connection, idle process {top['rss_idle_kb'] / 1024:.0f} MB) → "
                   f"~{(top['rss_idle_kb'] + per * 100_000) / 1024:.0f} MB projected at 100k | "
                   f"{top['n']:,} clients measured on one process (open-files cap 20,000) | fanout |")
    if soak:
        samples = soak["samples"]
        dur = samples[-1]["t_s"] - samples[0]["t_s"] if len(samples) > 1 else 0
        cpu = (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / dur * 100 if dur else float("nan")
        out.append(f"| CPU < 20 % per instance | {cpu:.1f} % of one core with {soak['n']:,} clients and a change "
                   f"every {soak['period_s']:g} s | {soak['n']:,} clients | soak |")
    elif amp and amp["rows"]:
        cpus = ", ".join(f"{r['after']['origin_cpu_pct']:.0f} % at {r['users']:,}" for r in amp["rows"])
        out.append(f"| CPU < 20 % per instance | {cpus} users (a change every second + polls through the CDN, "
                   f"% of one core) | see left | amplification |")
    if es_rows:
        out.append("| CPU per broadcast | " + ", ".join(f"{r['cpu_per_broadcast_ms']:.0f} ms at {r['n']:,}" for r in
                                                       sorted(es_rows, key=lambda r: r["n"]))
                   + " clients (one core) | – | fanout |")
    return out


def write() -> Path:
    results = load_results()
    IMG.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    lines = [
        "# edgestate benchmarks",
        "",
        "Generated by `python -m bench` (bench/) from the results of real runs in `bench/results/*.json`; "
        "nothing here is typed in by hand. Rerun: `pip install -e '.[bench]'` then `python -m bench all --quick` "
        "(about 5 minutes) or `--full`; one scenario: `python -m bench fanout|http|amplification|balances|pool|scaleout|soak|cost|rpc|attack|parse`. "
        "The harness installs nginx, libnginx-mod-nchan and wrk with apt-get and the Node `ws` client with npm "
        "when missing, runs everything on loopback, and stops what it started.",
        "",
        "All figures below come from one machine, named with each table; loopback only, so network latency is "
        "absent and both the server and the load client share one box (server on core 0, clients on core 1). "
        "Other processes on the machine (e.g. a test suite) show up as noise; the load average at the end of "
        "each run is in its results file.",
        "",
    ]
    lines += expected_section(results) + [""]
    lines += before_after_section(results) + [""]
    if "parse" in results:
        lines += parse_section(results["parse"]) + [""]
    if "attack" in results:
        lines += attack_section(results["attack"], results.get("attack-baseline")) + [""]
    else:
        lines += ["## attack", "", "Not run yet: `python -m bench attack`.", ""]
    for name, fn in (("fanout", fanout_section), ("http", http_section), ("amplification", amplification_section),
                     ("balances", balances_section), ("pool", pool_section), ("scaleout", scaleout_section),
                     ("soak", soak_section), ("cost", cost_section), ("rpc", rpc_section)):
        if name in results:
            lines += fn(results[name], plt) + [""]
        else:
            lines += [f"## {name}", "", f"Not run yet: `python -m bench {name}`.", ""]
    lines += [
        "## How to read these numbers",
        "",
        "- The load client is Node `ws` (bench/loadclient/client.js): several processes (≤ 4,500 connections per "
        "process and per source address), `ulimit -n` at the hard limit, connection rate capped (`--rate`), no "
        "permessage-deflate, frames scanned for the jackpot value without JSON parsing. It shares one core; at "
        "~12 µs per received message it needs ~0.23 s per broadcast at 19k clients, so at large N the *last "
        "client* latency of both servers is partly the client's. Both servers are measured with the same client "
        "in the same run: compare ratios, not absolute values across machines.",
        "- edgestate's latency includes one more hop than nchan's: the simulated provider's PubSub notification "
        "(simulator → trio-websocket → shared state → broadcaster); nchan gets the message by HTTP POST directly.",
        "- CPU per broadcast is the server's total CPU over the window divided by the number of updates, so at "
        "small N fixed background work (price polling every 2 s, participants every 10 s, timers) weighs on the "
        "per-client figure; the fan-out loop's own CPU is in edgestate's `/stats` (quoted under the table).",
        "- nginx runs one worker (`worker_processes 1`, `worker_connections 40000`, `worker_rlimit_nofile 20000`); "
        "with 19,800 worker connections nchan ran out of connections at 19k subscribers (\"worker_connections are "
        "not enough\"), so nchan needs more than one nginx connection slot per subscriber near the cap.",
        "- nginx `proxy_cache` runs without `proxy_cache_lock`: with the lock on, requests that find the entry "
        "being refreshed wait for it in nginx's 500 ms lock-polling steps (measured: p99 391-447 ms at ~35k req/s, "
        "0.6 origin req/s); without it p99 was 3.7 ms and the origin saw ~7 req/s. `proxy_cache_use_stale updating` "
        "+ `proxy_cache_background_update on` keep serving the cached copy meanwhile.",
        "- The machine is shared: other processes (test suites) ran on both cores during some runs; "
        "`machine.loadavg_at_end` in each results file shows it. Absolute HTTP rates here are ~4x below "
        "STACK-NOTES' figures for the same stack, and the bare-ASGI baseline (same run) dropped by the same "
        "factor: compare within a table.",
        "",
        "## Load-testing your own deployment",
        "",
        "`bench/locustfile.py` is a ready-made Locust scenario (GET /api/state, GET /api/price/<mint>, "
        "POST /api/tokens/balances, and /ws clients): `pip install locust websocket-client`, then "
        "`locust -f bench/locustfile.py --host https://your-edge.example` (see the top of the file).",
        "",
    ]
    path = DOCS / "benchmarks.md"
    path.write_text("\n".join(lines))
    return path.relative_to(ROOT)
