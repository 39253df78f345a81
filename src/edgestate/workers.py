"""``edgestate serve --workers N``: several processes behind one port, one upstream feed.

    supervisor (this module, no server of its own)
    ├── feed process        a normal edgestate on a private loopback port: the only one
    │                       that talks to the providers
    └── N worker processes  full edgestates in feed mode (upstream.parent = the feed's
                            /ws), each with its own SO_REUSEPORT listener on server.bind:
                            the kernel spreads new connections over them

One process holds at most ~20k sockets here (open-files limit) and one core fans out to
~65k clients a second; workers multiply both while the provider traffic stays one node's.

Members find each other through a private directory (``--stats-dir``): every member writes
``<id>.json`` (its URL and its /stats document) once a second. The supervisor learns the
feed's URL from it; every member's /stats shows a ``workers`` section summing them all,
and :func:`collect_all` is the whole set (``GET /stats?scope=all``). Figures from other
members are up to a second old.

A member that exits is restarted with backoff (the feed on the same port, so workers
reconnect to it). SIGTERM or SIGINT to the supervisor sends SIGTERM to every member, waits
up to ``server.graceful_timeout`` (+2 s) for them to drain, kills what is left, exits 0.
Members run in their own session (Ctrl-C in a terminal reaches only the supervisor) and
stop by themselves if the supervisor disappears.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from . import logs
from .config import Config
from .errors import ListenError
from .listen import split_bind
from .server import serve
from .services import Services

log = logging.getLogger("edgestate.workers")

FEED = "feed"
_PUBLISH_EVERY = 1.0
_STALE_FILE = 5.0  # a member file older than this is a member that is gone
_START_TIMEOUT = 30.0
_BACKOFF_BASE, _BACKOFF_CAP = 0.5, 10.0
_HEALTHY_AFTER = 30.0  # a run this long resets the backoff
_KILL_GRACE = 2.0

# This process's group directory when it is a member (one member per process).
_member_dir: str | None = None


# -- inside a member process --------------------------------------------------------------


async def run_member(cfg: Config, *, member: str, stats_dir: str, demo: bool = False) -> None:
    """Serve as one member of a supervised group (``serve --worker-id ... --stats-dir ...``).

    ``member`` is ``"feed"`` or the worker's number. Publishes ``<stats_dir>/<member>.json``
    every second; stops gracefully on SIGTERM (as ``serve`` does) or when the supervisor
    is gone.
    """
    global _member_dir
    _member_dir = stats_dir
    logs.set_worker(member)  # two members' lines must be told apart
    stop = trio.Event()
    path = Path(stats_dir) / f"{member}.json"
    async with trio.open_nursery() as nursery:

        async def serving(task_status: trio.TaskStatus[tuple[str, Services]]) -> None:
            try:
                await serve(cfg, demo=demo and member == FEED, stop=stop, task_status=task_status)
            finally:
                nursery.cancel_scope.cancel(reason="server stopped")

        url, services = await nursery.start(serving)
        services.worker = {
            "id": member if member == FEED else int(member),
            "pid": os.getpid(),
            "role": FEED if member == FEED else "worker",
        }
        services.extra_stats["workers"] = partial(summarize, stats_dir)
        services.collect_all = partial(collect_all, services)
        nursery.start_soon(_publish, services, url, path)
        nursery.start_soon(_watch_supervisor, os.getppid(), stop)
    path.unlink(missing_ok=True)


async def _publish(services: Services, url: str, path: Path) -> None:
    from .metrics import collect

    tmp = path.with_suffix(".tmp")
    while True:
        doc = {"url": url, "pid": os.getpid(), "written_at": time.time(), "stats": collect(services)}
        data = json.dumps(doc, default=str)
        await trio.to_thread.run_sync(_write_atomic, tmp, path, data)
        await trio.sleep(_PUBLISH_EVERY)


def _write_atomic(tmp: Path, path: Path, data: str) -> None:
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


async def _watch_supervisor(ppid: int, stop: trio.Event) -> None:
    while os.getppid() == ppid:  # noqa: ASYNC110 - no event tells us our parent died: poll
        await trio.sleep(1.0)
    log.warning("supervisor (pid %d) is gone: shutting down", ppid)
    stop.set()


def read_members(stats_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The live members' last published documents, by member id."""
    members: dict[str, dict[str, Any]] = {}
    now = time.time()
    try:
        paths = sorted(Path(stats_dir).glob("*.json"))
    except OSError:
        return members
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being replaced, or gone
        if isinstance(doc, dict) and now - float(doc.get("written_at", 0)) <= _STALE_FILE:
            members[path.stem] = doc
    return members


def summarize(stats_dir: str) -> dict[str, Any]:
    """The ``workers`` section of /stats: every member in a line, and the sums."""
    each = []
    # Sums over the workers: the feed process's WebSocket clients are the workers themselves.
    totals = {"websocket_clients": 0, "http_requests": 0, "broadcasts": 0}
    for member, doc in read_members(stats_dir).items():
        stats = doc.get("stats", {})
        clients = stats.get("broadcaster", {}).get("subscribers", 0)
        requests = stats.get("api", {}).get("requests", 0)
        each.append({
            "id": member,
            "pid": doc.get("pid"),
            "uptime_s": stats.get("server", {}).get("uptime_s"),
            "websocket_clients": clients,
            "http_requests": requests,
            "state_version": stats.get("state", {}).get("version"),
            "age_s": round(max(0.0, time.time() - float(doc.get("written_at", 0))), 3),
        })
        if member != FEED:
            totals["websocket_clients"] += clients
            totals["http_requests"] += requests
            totals["broadcasts"] += stats.get("broadcaster", {}).get("updates", 0)
    workers = sum(1 for m in each if m["id"] != FEED)
    return {"members": len(each), "workers": workers, "total": totals, "each": each}


def collect_all(services: Services) -> dict[str, Any] | None:
    """``GET /stats?scope=all``: every member's whole /stats document, and the sums.

    None when this process is not a member of a ``--workers`` group.
    """
    from .metrics import collect

    stats_dir = _member_dir
    if stats_dir is None or services.worker is None:
        return None
    docs = {member: doc.get("stats", {}) for member, doc in read_members(stats_dir).items()}
    docs[str(services.worker["id"])] = collect(services)  # our own, fresh
    return {"scope": "all", "summary": summarize(stats_dir), "members": docs}


# -- the supervisor ------------------------------------------------------------------------


class _Member:
    def __init__(self, member: str, argv: list[str], env: dict[str, str]) -> None:
        self.member, self.argv, self.env = member, argv, env
        self.process: trio.Process | None = None
        self.restarts = 0

    @property
    def name(self) -> str:
        return "feed process" if self.member == FEED else f"worker {self.member}"


class Supervisor:
    """Starts, watches, restarts and stops the members (see the module docstring).

    Args:
        cfg: the effective configuration (``server.bind``, ``server.workers``,
            ``server.graceful_timeout``).
        config_path: passed on to every member as ``--config`` (None: members find the
            config as the supervisor did: ``$EDGESTATE_CONFIG`` or ``./config.toml``).
        demo: the feed process runs the built-in simulated upstream.
        python: the interpreter for members (default: this one).
    """

    def __init__(
        self, cfg: Config, *, config_path: str | None = None, demo: bool = False, python: str = sys.executable
    ) -> None:
        self._cfg = cfg
        self._config_path = config_path
        self._demo = demo
        self._python = python
        self._stats_dir = ""
        self._stopping = False
        self.members: list[_Member] = []

    def _argv(self, member: str, bind: str) -> list[str]:
        # A one-file build (packaging/build.sh) is its own interpreter: no "-m edgestate".
        command = [self._python] if getattr(sys, "frozen", False) else [self._python, "-m", "edgestate"]
        argv = [*command, "serve", "--bind", bind,
                "--worker-id", member, "--stats-dir", self._stats_dir]
        if self._config_path is not None:
            argv += ["--config", self._config_path]
        if self._demo and member == FEED:
            argv.append("--demo")
        return argv

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or cancelled); ``task_status`` gets the public URL.

        Raises:
            ListenError: the public address cannot be bound.
            WorkerStartError: a member did not come up at start.
        """
        reserved = _reserve_port(self._cfg.server.bind)
        self._stats_dir = tempfile.mkdtemp(prefix="edgestate-workers-")
        try:
            host, port = reserved.getsockname()[:2]
            public = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, nursery.cancel_scope)
                feed_url = await self._start_feed(nursery)
                env = {
                    **self._base_env(),
                    "EDGESTATE_SERVER_REUSE_PORT": "true",
                    "EDGESTATE_UPSTREAM_PARENT": "ws" + feed_url[4:] + "/ws",
                }
                async with trio.open_nursery() as starting:  # in parallel: each takes ~1 s to import
                    for i in range(self._cfg.server.workers):
                        worker = _Member(str(i), self._argv(str(i), public), env)
                        self.members.append(worker)
                        starting.start_soon(nursery.start, self._keep, worker)
                log.info("edgestate workers: %d on http://%s, feed process on %s, supervisor pid %d",
                         self._cfg.server.workers, public, feed_url, os.getpid())
                task_status.started(f"http://{public}")
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()  # a no-op after a signal; else (start failure, cancel) no orphans
            reserved.close()
            shutil.rmtree(self._stats_dir, ignore_errors=True)

    def _base_env(self) -> dict[str, str]:
        return {**os.environ, "EDGESTATE_SERVER_WORKERS": "1", "PYTHONUNBUFFERED": "1"}

    async def _start_feed(self, nursery: trio.Nursery) -> str:
        # Port 0 first; restarts reuse the port it got, so workers find it again.
        env = self._base_env()
        if self._cfg.server.internal_bind:  # every member serves it: they share it like the public port
            env["EDGESTATE_SERVER_REUSE_PORT"] = "true"
        feed = _Member(FEED, self._argv(FEED, "127.0.0.1:0"), env)
        self.members.append(feed)
        url: str = await nursery.start(self._keep, feed)
        feed.argv = self._argv(FEED, url.removeprefix("http://"))
        return url

    async def _keep(self, m: _Member, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run member ``m``; restart it whenever it exits, until the group stops."""
        failures = 0
        first = True
        while True:
            started = trio.current_time()
            (Path(self._stats_dir) / f"{m.member}.json").unlink(missing_ok=True)
            m.process = await trio.lowlevel.open_process(m.argv, env=m.env, start_new_session=True)
            if first:
                task_status.started(await self._wait_published(m))
                first = False
            code = await m.process.wait()
            if self._stopping:
                return
            failures = 0 if trio.current_time() - started > _HEALTHY_AFTER else failures + 1
            delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (failures - 1)) if failures else _BACKOFF_BASE
            m.restarts += 1
            log.warning("%s (pid %d) exited with %s; restarting in %.1fs", m.name, m.process.pid, _exit(code), delay)
            await trio.sleep(delay)
            if self._stopping:
                return

    async def _wait_published(self, m: _Member) -> str:
        assert m.process is not None
        with trio.move_on_after(_START_TIMEOUT):
            while m.process.poll() is None:
                members = read_members(self._stats_dir)
                if m.member in members and members[m.member].get("pid") == m.process.pid:
                    return str(members[m.member]["url"])
                await trio.sleep(0.05)
        code = m.process.poll()
        if code is None:
            m.process.kill()
            await m.process.wait()
            raise WorkerStartError(f"{m.name} did not start within {_START_TIMEOUT:g}s")
        raise WorkerStartError(f"{m.name} failed to start ({_exit(code)}; its error is on stderr above)")

    async def _watch_signals(self, group: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s received: stopping %d processes (up to %gs)", signal.Signals(signum).name,
                         len(self.members), self._cfg.server.graceful_timeout)
                break
        await self.stop()
        group.cancel(reason="workers stopped")

    async def stop(self) -> None:
        """SIGTERM the workers, then the feed process; wait for them to drain, kill the rest.

        Workers go first so that they do not see their feed vanish while they drain.
        """
        self._stopping = True
        running = [m.process for m in self.members if m.process is not None and m.process.poll() is None]
        feed = [m.process for m in self.members if m.member == FEED and m.process in running]
        with trio.move_on_after(self._cfg.server.graceful_timeout + _KILL_GRACE):
            for group in ([p for p in running if p not in feed], feed):
                for proc in group:
                    _signal(proc, signal.SIGTERM)
                for proc in group:
                    await proc.wait()
        for proc in running:
            if proc.returncode is None:
                log.warning("pid %d did not stop in time: killing it", proc.pid)
                _signal(proc, signal.SIGKILL)
                await proc.wait()


class WorkerStartError(ListenError):
    """A member process did not come up when the group started (exit code 1)."""


def _signal(proc: trio.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def _exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _reserve_port(bind: str) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket on ``bind``: fails fast when the port
    is taken, fixes port 0 to one port, and holds it for the workers' lifetime."""
    host, port = split_bind(bind)
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise ListenError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        why = {errno.EADDRINUSE: "address already in use", errno.EACCES: "permission denied"}.get(
            exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {bind}: {why}") from None
    return sock


async def supervise(cfg: Config, *, config_path: str | None = None, demo: bool = False) -> None:
    """``edgestate serve`` with ``server.workers > 1``: run the group until a signal."""
    await Supervisor(cfg, config_path=config_path, demo=demo).run()


__all__ = ["FEED", "Supervisor", "WorkerStartError", "collect_all", "read_members", "run_member", "summarize",
           "supervise"]
