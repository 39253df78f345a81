"""The command line: exit codes, one-line errors, check-config, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from edgestate import __version__
from edgestate.cli import main

PY = [sys.executable, "-m", "edgestate"]


def run(*args: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=30, env=env, cwd=cwd)


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"edgestate {__version__}"


def test_bad_usage_is_one_line_exit_2():
    result = run("serve", "--bogus")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unrecognized arguments: --bogus" in result.stderr


def test_misspelt_key_one_line_exit_2(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[upstream]\nmax_conections = 3\n")
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "max_conections" in result.stderr and "did you mean 'max_connections'" in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_redacts_secrets(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nrpc_url = "https://rpc.example/?api-key=hunter2"\n')
    monkeypatch.setenv("JUPITER_API_KEY", "jupsecret")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "jupsecret" not in out
    assert 'rpc_url = ["https://rpc.example/?api-key=***"]' in out
    assert "max_connections = 10" in out


def test_busy_port_exit_1():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("serve", "--demo", "--bind", f"127.0.0.1:{port}", env={**os.environ, "EDGESTATE_CONFIG": "/dev/null"})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_serves_then_exits_0_on_signal(tmp_path, sig):
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\ngraceful_timeout = 2.0\n[log]\nformat = \"json\"\n")
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*PY, "serve", "--demo", "--config", str(cfg), "--bind", f"127.0.0.1:{port}"], stderr=err)
    try:
        deadline = time.monotonic() + 20
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert ready is not None and ready.status_code == 200, "never ready"
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
        stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
        assert {"pool", "rate_limiter", "cache", "upstream", "state", "broadcaster", "api"} <= set(stats)
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 2.0 + 1.5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert "Traceback" not in stderr
    assert '"msg": "stopped"' in stderr


def test_check_config_says_what_it_costs_and_which_limit_it_exceeds(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("[upstream]\nmax_requests_per_second = 50\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert last.startswith("# cost: ~") and "credits/month" in last and "price requests/month" in last
    assert "exceeds Helius Free: upstream.max_requests_per_second 50 > 10 req/s" in last
    assert err.count("\n") == 1 and err.startswith("edgestate: warning: cost:")
    path.write_text("[upstream]\nmax_requests_per_second = 10\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "within Helius Free" in out and err == ""
