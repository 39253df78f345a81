"""Start the pieces on loopback: simulator, edgestate, nginx (+nchan / static / proxy_cache), load clients."""

from __future__ import annotations

import http.client as httpclient
import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    BASELINE,
    CLIENT_CPUS,
    LOADCLIENT,
    SERVER_CPUS,
    AddressPool,
    Procs,
    children,
    edgestate_env,
    free_port,
    http,
    log,
    python,
    tmpdir,
    wait_http,
)


class KeepAlive:
    """A keep-alive HTTP/1.1 connection for the publisher (so each change costs one request)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = httpclient.HTTPConnection(host, port, timeout=10)

    def post(self, path: str, body: bytes) -> int:
        for attempt in range(2):
            try:
                self.conn.request("POST", path, body=body, headers={"content-type": "application/json"})
                r = self.conn.getresponse()
                r.read()
                return r.status
            except (OSError, httpclient.HTTPException):
                self.conn.close()
                self.conn = httpclient.HTTPConnection(self.host, self.port, timeout=10)
                if attempt:
                    raise
        return 0


def nchan_publisher(port: int, state: dict[str, Any]) -> Callable[[int], float]:
    """publish(lamports) -> wall time: POSTs edgestate's stateUpdate JSON with that jackpot to nchan."""
    ng = KeepAlive("127.0.0.1", port)
    template = dict(state)

    def publish(lamports: int) -> float:
        template["jackpot"] = lamports / 1e9
        body = json.dumps({"type": "stateUpdate", "state": template}, separators=(",", ":")).encode()
        t = time.time()
        ng.post("/pub", body)
        return t

    return publish


@dataclass
class Stack:
    procs: Procs
    dir: Path = field(default_factory=lambda: tmpdir("stack-"))
    sim_port: int = 0
    es_port: int = 0
    es_pid: int = 0
    ng_port: int = 0
    ng_worker: int = 0

    @property
    def sim(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def es(self) -> str:
        return f"http://127.0.0.1:{self.es_port}"

    @property
    def ng(self) -> str:
        return f"http://127.0.0.1:{self.ng_port}"

    # ------------------------------------------------------------ simulator + edgestate
    def config(self, extra: str = "") -> Path:
        path = self.dir / "edgestate.toml"
        # Load clients come from a few loopback addresses, thousands each: no per-address cap
        # (a key today's code, run as the baseline, does not know).
        cap = "" if BASELINE[0] else "max_connections_per_client = 0"
        path.write_text(
            f"""[server]
bind = "127.0.0.1:{self.es_port}"
{cap}
[upstream]
rpc_url = ["http://127.0.0.1:{self.sim_port}"]
ws_url = "ws://127.0.0.1:{self.sim_port}"
[price]
url = "http://127.0.0.1:{self.sim_port}/price/v3"
[log]
level = "warning"
{extra}
"""
        )
        return path

    def start_sim(self) -> None:
        self.sim_port = self.sim_port or free_port()
        self.es_port = self.es_port or free_port()
        cfg = self.config()
        self.procs.start("simulator", [python(), "-m", "edgestate", "simulate", "--config", str(cfg),
                                       "--bind", f"127.0.0.1:{self.sim_port}"], cpus=CLIENT_CPUS)
        wait_http(self.sim + "/control/stats")

    def start_edgestate(self, extra_config: str = "") -> None:
        """Start edgestate pinned to the server core; waits for /ready."""
        if not self.sim_port:
            self.start_sim()
        cfg = self.config(extra_config)
        proc = self.procs.start("edgestate", [python(), "-m", "edgestate", "serve", "--config", str(cfg)],
                                cpus=SERVER_CPUS, env=edgestate_env())
        self.es_pid = proc.pid
        wait_http(self.es + "/ready", timeout=30)
        _, stats = http("GET", self.es + "/stats")
        pid = stats.get("server", {}).get("pid") if isinstance(stats, dict) else None
        if pid and pid != self.es_pid:
            self.es_pid = int(pid)

    def set_jackpot(self, lamports: int) -> None:
        http("POST", self.sim + "/control/jackpot", {"lamports": lamports})

    def sim_counters(self) -> dict[str, Any]:
        _, body = http("GET", self.sim + "/control/stats")
        return body["counters"]

    def es_stats(self) -> dict[str, Any]:
        _, body = http("GET", self.es + "/stats")
        return body

    # ------------------------------------------------------------ nginx
    def start_nginx(self, *, nchan: bool = False, static_body: bytes | None = None, proxy_cache: bool = False,
                    workers: int = 1) -> None:
        self.ng_port = free_port()
        d = self.dir / f"nginx-{self.ng_port}"
        (d / "logs").mkdir(parents=True)
        (d / "www").mkdir()
        locations = []
        if nchan:
            locations.append("""
    location = /sub { nchan_subscriber websocket; nchan_channel_id bench; nchan_subscriber_first_message newest; }
    location = /pub { nchan_publisher; nchan_channel_id bench; nchan_message_buffer_length 1; nchan_message_timeout 60s; }""")
        if static_body is not None:
            (d / "www" / "state.json").write_bytes(static_body)
            locations.append(f"""
    location = /static/state.json {{ root {d}/www; rewrite ^ /state.json break; default_type application/json; }}""")
        upstream = ""
        if proxy_cache:
            upstream = f"""
  proxy_cache_path {d}/cache levels=1:2 keys_zone=edge:10m max_size=100m inactive=60s use_temp_path=off;
  upstream edgestate {{ server 127.0.0.1:{self.es_port}; keepalive 32; }}"""
            locations.append("""
    location /api/ {
      proxy_pass http://edgestate; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache edge; proxy_cache_background_update on;
      proxy_cache_use_stale updating error timeout http_502 http_503 http_504;
      add_header X-Cache-Status $upstream_cache_status;
    }""")
        conf = d / "nginx.conf"
        load = "load_module /usr/lib/nginx/modules/ngx_nchan_module.so;" if nchan else ""
        conf.write_text(f"""{load}
user root;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 40000; use epoll; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp_body; proxy_temp_path {d}/tmp_proxy; fastcgi_temp_path {d}/tmp_fcgi;
  uwsgi_temp_path {d}/tmp_uwsgi; scgi_temp_path {d}/tmp_scgi;
  keepalive_requests 1000000;{upstream}
  server {{
    listen 127.0.0.1:{self.ng_port} backlog=4096{' reuseport' if workers > 1 else ''};{''.join(locations)}
  }}
}}
""")
        proc = self.procs.start(f"nginx-{self.ng_port}", ["nginx", "-c", str(conf), "-p", str(d), "-g", "daemon off;"],
                                cpus=SERVER_CPUS)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not children(proc.pid):
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(d / 'logs' / 'error.log').read_text()[-500:]}")
            time.sleep(0.05)
        self.ng_worker = children(proc.pid)[0]
        time.sleep(0.2)


class LoadClients:
    """Several Node load-client processes (≤ per_proc connections each), pinned to the client cores."""

    def __init__(self, procs: Procs, pool: AddressPool, name: str = "loadclient") -> None:
        self.procs, self.pool, self.name = procs, pool, name
        self.clients: list[tuple[subprocess.Popen[Any], queue.Queue[dict[str, Any]]]] = []

    def add(self, url: str | None, count: int, *, per_proc: int = 5000, rate: float = 4000.0,
            poll: dict[str, Any] | None = None, nprocs: int | None = None) -> None:
        """Start processes for ``count`` more connections (and/or pollers); returns when all are ready."""
        n = nprocs or max(1, -(-count // per_proc))
        started = []
        for i in range(n):
            share = count // n + (1 if i < count % n else 0)
            argv = ["node", str(LOADCLIENT / "client.js"), "--rate", str(max(50.0, rate / n))]
            if url and share:
                argv += ["--url", url, "--count", str(share), "--addrs", ",".join(self.pool.take(share))]
            else:
                argv += ["--addrs", self.pool.take(1)[0]]
            if poll:
                argv += ["--poll-url", poll["url"], "--poll-rate", str(poll["rate"] / n), "--poll-method", poll.get("method", "GET")]
                if poll.get("body"):
                    argv += ["--poll-body", poll["body"]]
            proc = self.procs.start(f"{self.name}-{len(self.clients)}", argv, cpus=CLIENT_CPUS, stdin=True, stdout_pipe=True)
            q: queue.Queue[dict[str, Any]] = queue.Queue()
            threading.Thread(target=_reader, args=(proc, q), daemon=True).start()
            self.clients.append((proc, q))
            started.append((proc, q))
        timeout = 60 + count / max(rate, 1) * 3
        for proc, q in started:
            ev = self._wait(q, "ready", timeout)
            if ev.get("failed"):
                log(f"  load client {proc.pid}: {ev['failed']} connections failed")

    @staticmethod
    def _wait(q: queue.Queue[dict[str, Any]], event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"load client: no {event!r} within {timeout:.0f}s")
            try:
                ev = q.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("event") == "exit":
                raise RuntimeError("load client exited")
            if ev.get("event") == event:
                return ev

    def command(self, line: str, want: str, timeout: float = 60) -> None:
        for proc, _ in self.clients:
            assert proc.stdin
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        for _, q in self.clients:
            self._wait(q, want, timeout)

    def reset(self) -> None:
        self.command("reset", "reset")

    def dump(self, tag: str) -> list[dict[str, Any]]:
        """Each process's records and stats."""
        out_dir = tmpdir(f"dump-{tag}-")
        paths = [out_dir / f"{i}.json" for i in range(len(self.clients))]
        for (proc, _), path in zip(self.clients, paths):
            assert proc.stdin
            proc.stdin.write(f"dump {path}\n")
            proc.stdin.flush()
        for _, q in self.clients:
            self._wait(q, "dumped", 120)
        data = [json.loads(p.read_text()) for p in paths]
        for p in paths:
            p.unlink()
        out_dir.rmdir()
        return data

    def close(self) -> None:
        for proc, _ in self.clients:
            try:
                assert proc.stdin
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            except OSError:
                pass
        for proc, _ in self.clients:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.procs.stop(proc)
        self.clients = []


def _reader(proc: subprocess.Popen[Any], q: queue.Queue[dict[str, Any]]) -> None:
    assert proc.stdout
    try:
        for line in proc.stdout:
            try:
                q.put(json.loads(line))
            except ValueError:
                pass
    except (ValueError, OSError):  # pipe closed by Procs.stop
        pass
    q.put({"event": "exit"})
