"""docs/deployment.md's nginx example, run as written, with edgestate behind it.

Skipped (with the reason) when no ``nginx`` is on PATH; ``.ci/run`` installs it.
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import httpx
import pytest
import trio

from edgestate.views import ClientLimiter
from tests.conftest import make_config, start_server, wait_for
from tests.wsclient import WsClient

NGINX = shutil.which("nginx") or (shutil.which("nginx", path="/usr/sbin:/usr/local/sbin") or "")
DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


def test_forwarded_for_is_read_from_the_right():
    limiter = ClientLimiter(1.0, ("127.0.0.1", "10.0.0.0/8"))
    assert limiter.client_address("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    # A client that writes the header itself gets nothing from it: the proxy appended the truth.
    assert limiter.client_address("127.0.0.1", "1.2.3.4, 203.0.113.9") == "203.0.113.9"
    assert limiter.client_address("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.2.3") == "203.0.113.9"
    assert limiter.client_address("198.51.100.1", "1.2.3.4") == "198.51.100.1"  # untrusted peer: ignored
    assert limiter.client_address("127.0.0.1", "10.0.0.1") == "10.0.0.1"  # only proxies: the first hop


def example_config() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- nginx-example:begin -->\n```nginx\n(.*?)```\n<!-- nginx-example:end -->", text, re.S)
    assert match, "docs/deployment.md lost its nginx example markers"
    return match.group(1)


def test_example_has_the_parts_a_deployment_needs():
    conf = example_config()
    for needle in ("upstream edgestate", "proxy_cache_path", "proxy_cache edgestate", "location = /ws",
                   "location = /rpc", "proxy_set_header Upgrade $http_upgrade", "X-Forwarded-For"):
        assert needle in conf, needle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _nginx(tmp: Path, edge_port: int) -> tuple[trio.Process, int]:
    port = _free_port()
    conf = example_config()
    conf = conf.replace("server 127.0.0.1:8080;", f"server 127.0.0.1:{edge_port};")
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/var/cache/nginx/edgestate", str(tmp / "cache"))
    (tmp / "edgestate.conf").write_text(conf)
    temp = " ".join(f"{k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'} warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{ access_log off; {temp} include {tmp / 'edgestate.conf'}; }}\n"
    )
    proc = await trio.lowlevel.open_process([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf")])
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"nginx exited: {(tmp / 'error.log').read_text()}")
                await trio.sleep(0.02)
    return proc, port


@pytest.mark.skipif(not NGINX, reason="nginx is not installed (apt-get install nginx; .ci/run does)")
async def test_nginx_example_cached_cors_ws_and_forwarded_for(nursery, sim, tmp_path):
    cfg = make_config(sim.url, state=FAR, api={"trusted_proxies": ["127.0.0.1"], "per_client_rps": 1.0})
    edge = await start_server(nursery, cfg)
    await wait_for(lambda: edge.services.state.ready()[0])
    proc, port = await _nginx(tmp_path, int(edge.url.rsplit(":", 1)[1]))
    try:
        with trio.fail_after(10):
            front = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=front) as browser:
                first = await browser.get("/api/state")  # no Origin: what a CDN stores first
                assert first.status_code == 200 and first.headers["x-cache-status"] in ("MISS", "EXPIRED")
                later = await browser.get("/api/state", headers={"Origin": "https://app.example"})
                # Served from nginx's cache to a browser: it must still carry the CORS header.
                assert later.headers["x-cache-status"] == "HIT"
                assert later.headers["access-control-allow-origin"] == "*"
                assert later.json() == first.json()
            ws = await WsClient.connect(front, origin="https://app.example")
            assert ws.status == 101
            assert (await ws.message())["type"] == "stateUpdate"
            await ws.aclose()

            # Per-client limit keyed by the browser's address that nginx forwards (clients
            # on 127.0.0.2 and 127.0.0.3; nginx itself reaches edgestate from 127.0.0.1).
            async def statuses(source: str, n: int) -> list[int]:
                transport = httpx.AsyncHTTPTransport(local_address=source)
                async with httpx.AsyncClient(base_url=front, transport=transport) as client:
                    return [(await client.get(f"/api/state?n={source}-{i}",
                                              headers={"X-Forwarded-For": "198.51.100.77"})).status_code
                            for i in range(n)]

            busy = await statuses("127.0.0.2", 6)
            assert 429 in busy, busy  # its own spoofed X-Forwarded-For did not give it a fresh bucket
            assert (await statuses("127.0.0.3", 1)) == [200]  # another browser still has its share
    finally:
        proc.terminate()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await edge.shutdown()
