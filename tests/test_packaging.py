"""One file to deploy: dist/edgestate, the container image and the systemd unit.

The build itself is slow (a minute or two) and is not part of the quick CI run:
``EDGESTATE_PACKAGING=1 python -m pytest -q -m packaging`` builds dist/edgestate with
packaging/build.sh and runs it from an empty environment (``env -i``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from edgestate import __version__, config

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "dist" / "edgestate"


def test_systemd_unit_raises_open_files_and_stops_gracefully():
    unit = (ROOT / "packaging" / "edgestate.service").read_text()
    values = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert int(values["LimitNOFILE"]) >= 100_000  # not systemd's soft 1,024
    assert values["KillSignal"] == "SIGTERM" and values["KillMode"] == "mixed"
    graceful = config.from_dict({}, environ={}).server.graceful_timeout
    assert float(values["TimeoutStopSec"]) > graceful + 2  # + the members' kill grace (workers.py)
    assert values["User"] != "root" and "serve" in values["ExecStart"]
    assert values["RestartPreventExitStatus"] == "2"


def test_containerfile_multi_stage_non_root_with_healthcheck():
    text = (ROOT / "packaging" / "Containerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.M)
    assert "STOPSIGNAL SIGTERM" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["env", "-i", str(BINARY), *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/")


@pytest.mark.packaging
@pytest.mark.skipif(os.environ.get("EDGESTATE_PACKAGING") != "1",
                    reason="slow: set EDGESTATE_PACKAGING=1 to build dist/edgestate (packaging/build.sh)")
def test_one_file_binary_runs_without_python(tmp_path):
    build = subprocess.run([str(ROOT / "packaging" / "build.sh")], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    assert BINARY.is_file() and os.access(BINARY, os.X_OK)

    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"edgestate {__version__}"
    assert _run("serve", "--bogus").returncode == 2
    missing = _run("check-config", "--config", "/nonexistent.toml")
    assert missing.returncode == 2 and "config file not found" in missing.stderr and "Traceback" not in missing.stderr
    generated = _run("genconfig")
    assert generated.returncode == 0 and "[server]" in generated.stdout

    port = _free_port()
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        proc = subprocess.Popen(["env", "-i", str(BINARY), "serve", "--demo", "--bind", f"127.0.0.1:{port}"],
                                stderr=err, cwd="/")
    try:
        deadline = time.monotonic() + 60  # the one-file binary unpacks itself first
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.status_code == 200, log.read_text()
        assert health.json()["version"] == __version__
        # the same port again: exit 1, one line
        busy_run = _run("serve", "--demo", "--bind", f"127.0.0.1:{port}")
        assert busy_run.returncode == 1 and "address already in use" in busy_run.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
