"""Shared plumbing of the benchmark harness: processes, ports, addresses, /proc, HTTP, installs.

Everything started here is tracked by PID in a :class:`Procs` group and stopped by PID
(never by name). All traffic stays on loopback.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"  # raw outputs, logs (git-ignored)
RESULTS = BENCH / "results"  # per-scenario JSON the report is built from (committed)
LOADCLIENT = BENCH / "loadclient"
DOCS = ROOT / "docs"
IMG = DOCS / "img"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
# Server on core 0, load client (and the harness, wrk) on the other cores.
SERVER_CPUS = "0"
CLIENT_CPUS = ",".join(str(c) for c in range(1, NCPU)) or "0"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": NCPU,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict[str, Any]) -> str:
    return f"{m['cores']} cores ({m['cpu_model'] or 'cpu'}), {m['mem_gib']} GiB, {m['date']}"


# ---------------------------------------------------------------- /proc
def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# ---------------------------------------------------------------- ports / addresses
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AddressPool:
    """Source addresses for load clients: fresh 127.x.y.z blocks each run (TIME_WAIT lasts 60 s)."""

    PER_ADDR = 4500

    def __init__(self) -> None:
        state = OUT / "addr-block"
        try:
            block = (int(state.read_text()) + 1) % 200
        except (OSError, ValueError):
            block = random.randrange(200)
        OUT.mkdir(parents=True, exist_ok=True)
        state.write_text(str(block))
        self._second = 20 + block  # 127.<20..219>.y.z
        self._n = 0

    def take(self, count: int) -> list[str]:
        """Addresses enough for ``count`` connections (PER_ADDR each)."""
        out = []
        for _ in range(max(1, -(-count // self.PER_ADDR))):
            self._n += 1
            third, fourth = divmod(self._n, 250)
            out.append(f"127.{self._second}.{third}.{fourth + 2}")
        return out


# ---------------------------------------------------------------- processes
def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.setsid()


class Procs:
    """The processes this run started; stopped by PID, in reverse order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: list[str], *, cpus: str | None = None, stdin: bool = False,
              stdout_pipe: bool = False, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        if cpus and shutil.which("taskset") and NCPU > 1:
            argv = ["taskset", "-c", cpus, *argv]
        OUT.mkdir(parents=True, exist_ok=True)
        logf = open(OUT / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            preexec_fn=_raise_nofile,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
        )
        logf.close()  # the child holds its own copy
        self.items.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 8.0) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self.items = [(n, p) for n, p in self.items if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.items)):
            self.stop(proc)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# ---------------------------------------------------------------- HTTP
def http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", "accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def wait_http(url: str, timeout: float = 20.0, want: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, _ = http("GET", url, timeout=2)
            if status == want:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} not answering {want} after {timeout}s (last: {last})")


# ---------------------------------------------------------------- installs
def ensure_apt(packages: dict[str, str]) -> list[str]:
    """Install missing Debian packages (binary → package); the binaries still missing."""
    missing = {b: p for b, p in packages.items() if not _have(b)}
    if missing and shutil.which("apt-get"):
        pkgs = sorted(set(missing.values()))
        log(f"installing {' '.join(pkgs)} with apt-get")
        try:
            subprocess.run(["apt-get", "install", "-y", *pkgs], check=False, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"apt-get failed: {e}")
        # Debian's postinst starts nginx on :80; we run our own instances only.
        _stop_system_nginx()
    still = [b for b in packages if not _have(b)]
    for b in still:
        log(f"SKIP: {b} unavailable (apt-get install -y {packages[b]} failed or no apt): its comparisons are skipped")
    return still


def _have(binary: str) -> bool:
    if binary == "nchan":
        return Path("/usr/lib/nginx/modules/ngx_nchan_module.so").exists()
    return shutil.which(binary) is not None


def _stop_system_nginx() -> None:
    pid_file = Path("/run/nginx.pid")
    if pid_file.exists():
        try:
            pid = int(pid_file.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"nginx" in f.read():
                    os.kill(pid, signal.SIGQUIT)
                    log(f"stopped the nginx service apt just started (pid {pid})")
        except (OSError, ValueError):
            pass


def ensure_node_client() -> bool:
    if not shutil.which("node"):
        log("SKIP: node not found: the WebSocket scenarios need node (apt-get install -y nodejs npm)")
        return False
    if not (LOADCLIENT / "node_modules" / "ws").exists():
        log("npm install (ws) in bench/loadclient")
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=LOADCLIENT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=300)
        if r.returncode != 0:
            log("SKIP: npm install failed in bench/loadclient")
            return False
    return True


COMMAND = ["python -m bench"]  # set by __main__ to the command line actually run
# `--baseline PATH`: the edgestate processes run that checkout's src/ (today's code), and
# results are saved as <scenario>-baseline.json, for before/after figures from one run.
BASELINE: list[str | None] = [None]


def edgestate_env() -> dict[str, str]:
    """Environment for an edgestate process: the baseline's sources when one is being run."""
    return {"PYTHONPATH": str(Path(BASELINE[0]) / "src")} if BASELINE[0] else {}


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data.setdefault("command", COMMAND[0])
    data["machine"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    if BASELINE[0]:
        data["baseline"] = BASELINE[0]
        name += "-baseline"
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return path


def load_results() -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(RESULTS.glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except ValueError:
            pass
    return out


def tmpdir(prefix: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=OUT))


def python() -> str:
    return sys.executable
