"""The ``edgestate`` command: serve, simulate, check-config, genconfig.

Exit codes: 0 normal end (also after SIGTERM/SIGINT), 1 runtime failure (e.g. port
busy), 2 bad usage or bad config. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from . import __version__, config, logs
from .errors import ConfigError, EdgeStateError

log = logging.getLogger("edgestate.cli")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, as every other error; argparse's default prints the usage too.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgestate", description="Trio edge server between dApp browsers and Solana/price providers.")
    parser.add_argument("--version", action="version", version=f"edgestate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="config file (default: $EDGESTATE_CONFIG, else ./config.toml)")
    serve.add_argument("--bind", help="HOST:PORT to listen on (overrides server.bind)")
    serve.add_argument("--demo", action="store_true", help="run against the built-in simulated upstream")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="N worker processes sharing the port, fed by one upstream-facing process "
                            "(overrides server.workers; see docs/deployment.md)")
    # Set by the --workers supervisor for its member processes (workers.py), not by people.
    serve.add_argument("--worker-id", help=argparse.SUPPRESS)
    serve.add_argument("--stats-dir", help=argparse.SUPPRESS)
    sim = sub.add_parser("simulate", help="run only the simulated upstream (Solana RPC, PubSub, price API)")
    sim.add_argument("--config", help="config whose accounts the simulator creates")
    sim.add_argument("--bind", default="127.0.0.1:8899", help="HOST:PORT (default 127.0.0.1:8899)")
    sim.add_argument("--demo", action="store_true", help="let prices drift and participants join")
    check = sub.add_parser("check-config", help="validate and print the effective config (secrets as ***)")
    check.add_argument("--config", help="config file (default: $EDGESTATE_CONFIG, else ./config.toml)")
    sub.add_parser("genconfig", help="print the documented default config.toml (every key, commented)")
    return parser


def default_config_text() -> str:
    """The documented default config.toml shipped in the package (``edgestate genconfig``)."""
    from importlib import resources

    return resources.files("edgestate").joinpath("config.toml").read_text(encoding="utf-8")


def _load(args: argparse.Namespace) -> config.Config:
    cfg = config.load(args.config)
    if getattr(args, "bind", None) and args.command == "serve":
        cfg = cfg.replace("server", bind=args.bind)
    if getattr(args, "workers", None) is not None and args.command == "serve":
        cfg = cfg.replace("server", workers=args.workers)
    return cfg


async def _simulate(cfg: config.Config, bind: str, demo: bool) -> None:
    from .errors import ListenError
    from .sim import World, run_demo_drift, serve_simulator

    world = World.from_config(cfg)
    async with trio.open_nursery() as nursery:
        try:
            url = await nursery.start(serve_simulator, world, bind)
        except OSError as exc:
            raise ListenError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
        if demo:
            nursery.start_soon(run_demo_drift, world)
        logging.getLogger("edgestate.sim").info(
            "simulated upstream on %s: JSON-RPC POST /, PubSub ws://%s/, prices %s/price/v3, control %s/control/stats",
            url, url.removeprefix("http://"), url, url,
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "genconfig":
            sys.stdout.write(default_config_text())
            return 0
        cfg = _load(args)
    except UsageError as exc:
        print(f"edgestate: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:  # every problem of the file, one line each
            print(f"edgestate: config error: {problem}", file=sys.stderr)
        return 2

    from .upstream.costs import cost_line, forecast

    if args.command == "check-config":
        for warning in cfg.warnings:
            print(f"edgestate: warning: {warning}", file=sys.stderr)
        sys.stdout.write(config.to_toml(cfg))
        # What it costs a month, as a TOML comment (the output stays valid TOML).
        sys.stdout.write(f"# {cost_line(cfg)}\n")
        if forecast(cfg).exceeded and not cfg.upstream.parent:
            print(f"edgestate: warning: {cost_line(cfg)}", file=sys.stderr)
        return 0

    logs.setup(cfg.log)
    if args.command == "serve" and args.worker_id is None:
        exceeded = bool(forecast(cfg).exceeded) and not cfg.upstream.parent
        log.log(logging.WARNING if exceeded else logging.INFO, "%s", cost_line(cfg))
    for warning in cfg.warnings:
        log.warning("%s", warning)
    try:
        if args.command == "serve" and args.worker_id is not None:
            from .workers import run_member

            trio.run(partial(run_member, cfg, member=args.worker_id, stats_dir=args.stats_dir, demo=args.demo))
        elif args.command == "serve" and cfg.server.workers > 1:
            from .workers import supervise

            trio.run(partial(supervise, cfg, config_path=args.config, demo=args.demo))
        elif args.command == "serve":
            from .server import serve

            trio.run(partial(serve, cfg, demo=args.demo))
        else:
            trio.run(_simulate, cfg, args.bind, args.demo)
    except KeyboardInterrupt:  # a second Ctrl-C: leave now
        return 0
    except BaseException as exc:
        # Expected failures arrive bare or inside a nursery's exception group.
        error = _expected(exc)
        if error is None:
            raise
        kind = "config error" if isinstance(error, ConfigError) else "error"
        for line in error.problems if isinstance(error, ConfigError) else [str(error)]:
            print(f"edgestate: {kind}: {line}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


def _expected(exc: BaseException) -> EdgeStateError | None:
    if isinstance(exc, EdgeStateError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _expected(inner)
            if found is not None:
                return found
    return None
