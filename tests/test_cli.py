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
    assert '"event": "stopped"' in stderr
    assert "Running on" not in stderr  # the simulator's address is not announced as the server's
    import json
    import re

    for line in stderr.splitlines():
        doc = json.loads(line)  # every line one JSON object, with the fields log shippers index
        assert {"ts", "level", "logger", "event"} <= set(doc), doc
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"]), doc["ts"]


# ---- issue 13: config UX ---------------------------------------------------------------


def test_genconfig_prints_the_shipped_config_and_it_passes_check_config(tmp_path):
    from pathlib import Path

    from edgestate import config

    result = run("genconfig")
    assert result.returncode == 0 and result.stderr == ""
    root = Path(__file__).resolve().parents[1]
    assert result.stdout == (root / "config.toml").read_text(encoding="utf-8")  # one text, two places
    assert result.stdout == (root / "src/edgestate/config.toml").read_text(encoding="utf-8")
    path = tmp_path / "gen.toml"
    path.write_text(result.stdout)
    checked = run("check-config", "--config", str(path), env={"PATH": os.environ.get("PATH", "")})
    # Nothing but the cost line's warning (the contract's 100 req/s default is over Helius Free's 10).
    assert checked.returncode == 0, checked.stderr
    assert [line for line in checked.stderr.splitlines() if not line.startswith("edgestate: warning: cost:")] == []
    generated = config.load(path, environ={})
    assert generated == config.from_dict({}, environ={})  # the defaults, exactly
    # Every key, commented: each appears as "key = " in its section, with a comment on its line or above.
    text = result.stdout
    for section, table in config.to_dict(config.from_dict({}, environ={})).items():
        body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key in table:
            # A key whose default depends on the environment is shown commented out (price.
            # max_requests_per_second: 0.5/s keyless, the key's plan with JUPITER_API_KEY).
            present = f"\n{key} = " in "\n" + body or f"\n# {key} = " in "\n" + body
            assert present, f"{section}.{key} missing from config.toml"


def test_check_config_lists_every_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nbind = "nowhere"\nallowed_origins = ["https://app.example/"]\n'
                    '[upstream]\nmax_conections = 3\nmax_retries = -1\n[nope]\n')
    result = run("check-config", "--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith(f"edgestate: config error: {path}: ") for line in lines)
    for needle in ("server.bind", "allowed_origins[0]", "max_conections", "max_retries", "[nope]"):
        assert any(needle in line for line in lines), needle


def test_unknown_edgestate_variables_warn_and_empty_values_are_unset(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "EDGESTATE_SERVICE_PORT": "tcp://10.0.0.1:80",
           "EDGESTATE_SERVICE_HOST": "10.0.0.1", "EDGESTATE_UPSTREAM_MAX_CONNECTIONS": "",
           "EDGESTATE_CONFIG": "/dev/null"}
    result = run("check-config", env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "EDGESTATE_SERVICE_PORT: not a config key, ignored" in result.stderr
    assert "max_connections = 10" in result.stdout


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
