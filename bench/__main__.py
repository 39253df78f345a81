"""python -m bench {all,fanout,http,amplification,balances,pool,soak,scaleout,cost,report} [--quick|--full]

Installs what it needs when missing (apt-get: nginx, libnginx-mod-nchan, wrk; npm: ws in
bench/loadclient; pip: matplotlib for the plots), starts everything on loopback, runs bounded
scenarios, stops what it started (by PID), and writes docs/benchmarks.md and docs/img/*.png
from bench/results/*.json (each scenario run replaces its own results file).

  --quick   (default) about 5 minutes: fan-out 1k/5k, HTTP 5 s runs, amplification 1k/10k,
            balances 10/100/1000, pool overhead 2,000 calls + 5 s coalescing mix
  --full    fan-out 1k/5k/10k/19k (20 updates each), HTTP 10 s, amplification 1k/10k/19k
            with 30 s windows, balances, soak 10k clients × 10 min
  attack    a client's GET latency alone and while 3,000 connections hold half-done requests
  parse     CPU per request head: llhttp (heads.py) vs h11
  --baseline PATH   run each scenario against a checkout of the previous code first, in the same run
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common
from .common import log

SCENARIOS = ("fanout", "http", "attack", "parse", "amplification", "balances", "pool", "soak", "scaleout", "cost",
             "rpc")


def _deps(need_nginx: bool, need_wrk: bool, need_node: bool) -> dict[str, bool]:
    wanted = {}
    if need_nginx:
        wanted.update(nginx="nginx", nchan="libnginx-mod-nchan")
    if need_wrk:
        wanted["wrk"] = "wrk"
    missing = common.ensure_apt(wanted) if wanted else []
    node = common.ensure_node_client() if need_node else True
    return {"nginx": "nginx" not in missing, "nchan": "nchan" not in missing and "nginx" not in missing,
            "wrk": "wrk" not in missing, "node": node}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=("all", "report", *SCENARIOS))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small, about 5 minutes in all (default)")
    mode.add_argument("--full", action="store_true", help="the full sizes (about 20 minutes with the soak)")
    p.add_argument("--ns", help="fan-out client counts, comma separated (overrides the mode's)")
    p.add_argument("--users", help="amplification user counts, comma separated")
    p.add_argument("--updates", type=int, default=20, help="state changes per fan-out size (default 20)")
    p.add_argument("--rate", type=float, default=4000.0, help="WebSocket connections opened per second in all")
    p.add_argument("--soak-minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=6, help="scaleout: worker processes (default 6)")
    p.add_argument("--hours", type=float, default=2.0, help="cost: virtual hours of lottery activity (default 2)")
    p.add_argument("--join-every", type=float, default=30.0, help="cost: seconds between participant joins")
    p.add_argument("--rpc-parts", default="abc", help="rpc: which of (a) subscriptions, (b) statuses, (c) read mix")
    p.add_argument("--frontends", help="rpc (c): frontend counts, comma separated (default 100,1000,10000)")
    p.add_argument("--no-report", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--baseline", metavar="PATH",
                   help="a checkout of today's code: each scenario runs against it first (saved as "
                        "<scenario>-baseline.json), then against this code, in the same run")
    args = p.parse_args(argv)
    full = args.full
    common.COMMAND[0] = "python -m bench " + " ".join(argv)

    todo = SCENARIOS if args.scenario == "all" else (() if args.scenario == "report" else (args.scenario,))
    if args.scenario == "all" and not full:
        todo = tuple(s for s in todo if s not in ("soak", "scaleout", "rpc"))
    deps = _deps(need_nginx=bool({"fanout", "http", "amplification"} & set(todo)),
                 need_wrk="http" in todo,
                 need_node=bool({"fanout", "amplification", "soak", "scaleout"} & set(todo)))
    t0 = time.monotonic()
    failed = []
    runs = [(name, base) for name in todo for base in ([args.baseline, None] if args.baseline else [None])]
    for name, base in runs:
        common.BASELINE[0] = base
        log(f"=== {name} ({'full' if full else 'quick'}){' on the baseline ' + base if base else ''}")
        try:
            if name == "fanout":
                if not deps["node"]:
                    continue
                from . import fanout
                ns = [int(x) for x in args.ns.split(",")] if args.ns else ([1000, 5000, 10000, 19000] if full else [1000, 5000])
                fanout.run(ns, updates=args.updates, rate=args.rate, skip_nchan=not deps["nchan"])
            elif name == "http":
                if not deps["wrk"]:
                    continue
                from . import httpbench
                httpbench.run(duration=10 if full else 5, with_nginx=deps["nginx"])
            elif name == "parse":
                from . import parse
                parse.run()
            elif name == "attack":
                from . import attack
                attack.run()
            elif name == "amplification":
                if not (deps["node"] and deps["nginx"]):
                    log("SKIP amplification: needs node and nginx")
                    continue
                from . import amplify
                users = [int(x) for x in args.users.split(",")] if args.users else ([1000, 10000, 19000] if full else [1000, 10000])
                amplify.run(users, window=30.0 if full else 6.0, rate=args.rate)
            elif name == "balances":
                from . import balances
                balances.run([10, 100, 1000])
            elif name == "pool":
                from . import pool
                pool.run(20_000 if full else 2000, coalescing_s=20.0 if full else 5.0)
            elif name == "scaleout":
                if not deps["node"]:
                    continue
                from . import scaleout
                ns = [int(x) for x in args.ns.split(",")] if args.ns else [20_000, 50_000, 100_000]
                scaleout.run(ns, workers=args.workers, updates=10, rate=args.rate)
            elif name == "cost":
                from . import cost
                cost.run(hours=args.hours, join_every=args.join_every)
            elif name == "rpc":  # issue 12: /rpc subscriptions shared, signature statuses merged
                from . import rpc
                fronts = tuple(int(x) for x in args.frontends.split(",")) if args.frontends else (100, 1000, 10000)
                rpc.run([int(x) for x in args.ns.split(",")] if args.ns else ([1000, 10000] if full else [10000]),
                        frontends=fronts, only=args.rpc_parts)
            elif name == "soak":
                if not deps["node"]:
                    continue
                from . import soak
                soak.run(10_000 if full or args.scenario == "soak" else 2000, minutes=args.soak_minutes, rate=args.rate)
        except Exception as exc:  # one scenario failing must not lose the others' results
            log(f"FAILED {name}: {type(exc).__name__}: {exc}")
            failed.append(name)
    log(f"scenarios done in {time.monotonic() - t0:.0f}s")
    if not args.no_report:
        from . import report
        path = report.write()
        log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
