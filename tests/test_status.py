"""GET /status: one self-contained HTML page, checked in headless Chromium.

``EDGESTATE_STATUS_SCREENSHOT=docs/img/status.png python -m pytest -q tests/test_status.py``
also writes the screenshot of docs (after ~40 s of demo traffic, so that the charts have lines).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
import trio

from tests.browser import CHROMIUM, start_browser
from tests.conftest import make_config, start_server, wait_for

FAST = {"price_interval": 0.5, "participants_interval": 1.0}


async def test_status_page_is_self_contained(nursery, sim):
    server = await start_server(nursery, make_config(sim.url))
    async with httpx.AsyncClient(base_url=server.url) as client:
        resp = await client.get("/status")
    await server.shutdown()
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    # No external assets: no src/href to anything, no CSS imports or url(), no absolute URLs.
    assert not re.search(r"""\b(src|href)\s*=""", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert not re.search(r"https?://", html)
    assert "default-src 'none'" in resp.headers["content-security-policy"]


@pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
async def test_status_page_live_in_chromium(nursery, sim, tmp_path, ws_connect):
    target = os.environ.get("EDGESTATE_STATUS_SCREENSHOT")
    server = await start_server(nursery, make_config(sim.url, state=FAST))
    await wait_for(lambda: server.services.state.ready()[0])
    viewers = [await ws_connect(server.url) for _ in range(3)]  # clients to count
    browser = await start_browser(nursery, tmp_path / "profile")
    with trio.fail_after(120 if target else 20):
        page = await browser.open(server.url + "/status")
        await page.wait_for("document.getElementById('ws').textContent === 'live'")
        want = f"{sim.world.jackpot / 1e9:.4f}".rstrip("0").rstrip(".")
        await page.wait_for(f"document.getElementById('jackpot').textContent.startsWith('{want}')")
        # Two /stats polls: every figure shown, and each chart has points.
        await page.wait_for("document.getElementById('calls').textContent !== '–'", timeout=8)
        assert await page.evaluate("document.getElementById('clients').textContent") == "4"  # 3 + the page
        assert await page.evaluate("document.getElementById('ready').textContent") == "ready"
        for name in ("clients", "calls", "credits", "hits", "fanout", "http"):
            assert await page.evaluate(f"(series['{name}'] || []).length") >= 1, name
        if target:  # the docs' picture: let the charts fill with a little demo traffic
            async with httpx.AsyncClient(base_url=server.url) as client:
                for i in range(40):
                    sim.world.add_jackpot(50_000_000 * (1 + i % 3))
                    if i % 4 == 0:
                        sim.world.add_participants(1 + i % 2)
                    for _ in range(5 + (i * 7) % 20):
                        await client.get("/api/state")
                    viewers.append(await ws_connect(server.url))
                    await trio.sleep(1.0)
            await page.screenshot(Path(target), width=1280, height=820)
        else:
            await page.screenshot(tmp_path / "status.png")
            assert (tmp_path / "status.png").read_bytes().startswith(b"\x89PNG")
    await server.shutdown()
