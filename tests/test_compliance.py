"""Autobahn|Testsuite cases 1-10 against compliance/echo_server.py, as CI runs them.

The echo server is built from the /ws modules (heads, ws.check_upgrade, ws.receive,
wsframes), so this is the RFC 6455 conformance of /ws's framing and closing. ~15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}


def test_autobahn_cases_1_to_10_all_pass(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUTDIR": str(tmp_path / "reports")}
    done = subprocess.run(
        ["bash", str(ROOT / "compliance" / "run.sh")], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # the echo server prints nothing but errors
    [cases] = json.loads((tmp_path / "reports" / "index.json").read_text()).values()
    categories = {case_id.split(".")[0] for case_id in cases}
    assert categories == {"1", "2", "3", "4", "5", "6", "7", "9", "10"}
    assert len(cases) >= 300
    bad = {k: (v["behavior"], v["behaviorClose"]) for k, v in cases.items()
           if v["behavior"] not in ACCEPTABLE or v["behaviorClose"] not in ACCEPTABLE}
    assert bad == {}
    # The cases the issue found failing on /ws: 1007, 1002, the server closing TCP.
    assert all(cases[c]["remoteCloseCode"] == 1007 for c in ("6.3.1", "6.4.1", "6.4.2"))
    assert all(cases[f"7.9.{i}"]["remoteCloseCode"] == 1002 for i in range(1, 10))
    assert cases["7.3.2"]["remoteCloseCode"] == 1002
