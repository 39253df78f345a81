"""clients/js/edgestate.js in headless Chromium against a real server and the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.browser import CHROMIUM, serve_files, start_browser
from tests.conftest import make_config, start_server, wait_for

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "js" / "edgestate.js"
FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}

pytestmark = pytest.mark.skipif(not CHROMIUM, reason="chromium is not installed (apt-get install chromium; .ci/run does)")

PAGE = """<!doctype html><meta charset="utf-8"><title>client test</title>
<script type="module">
import { EdgeStateClient, reconnectDelay } from "/edgestate.js";
window.states = []; window.events = [];
const client = new EdgeStateClient(%(edge)s, {minDelay: 50, maxDelay: 400, tryAgainLaterDelay: 1500,
                                              restartSpread: 300, pollInterval: 100});
client.onState((s) => window.states.push(s));
client.onStatus((status, close) => window.events.push({status, code: close ? close.code : null,
                                                       delay: close ? close.delay : null}));
client.start();
window.client = client;
window.reconnectDelay = reconnectDelay;
</script>"""


async def test_client_reconnects_by_close_code_and_polls_meanwhile(nursery, sim, tmp_path):
    server = await start_server(nursery, make_config(sim.url, state=FAR))
    await wait_for(lambda: server.services.state.ready()[0])
    page_url = await serve_files(nursery, {
        "/": ("text/html", (PAGE % {"edge": json.dumps(server.url)}).encode()),
        "/edgestate.js": ("text/javascript", CLIENT.read_bytes()),
    })
    browser = await start_browser(nursery, tmp_path / "profile")
    with trio.fail_after(30):
        page = await browser.open(page_url + "/")
        await page.wait_for("window.client && window.client.status === 'open' && window.states.length >= 1")
        first = await page.evaluate("window.states[0]")
        assert first["jackpot"] == sim.world.jackpot / 1e9

        # A change upstream reaches the page over /ws.
        sim.world.set_jackpot(sim.world.jackpot + 1_000_000_000)
        want = sim.world.jackpot / 1e9
        await page.wait_for(f"window.states.some((s) => s.jackpot === {want})")

        # Server full (1013): the client backs off longer, and polls /api/state meanwhile.
        not_modified = server.services.extra_stats["api"]()["not_modified"]
        server.services.hub.close_all(1013, "server full, try again later")
        close = await page.wait_for("window.client.status === 'polling' && window.client.lastClose")
        assert close["code"] == 1013 and close["delay"] >= 1500
        await trio.sleep(0.3)  # a few polls of the unchanged state: 304s
        sim.world.set_jackpot(sim.world.jackpot + 1_000_000_000)
        want = sim.world.jackpot / 1e9
        # Not over /ws (it is down): by polling, cross-origin (CORS) with ETags.
        await page.wait_for(f"window.client.status === 'polling' && window.states.some((s) => s.jackpot === {want})")
        # The page could read the ETag cross-origin (Access-Control-Expose-Headers) and polls with it.
        assert await page.evaluate("window.client._etag")
        await wait_for(lambda: server.services.extra_stats["api"]()["not_modified"] > not_modified)
        await page.wait_for("window.client.status === 'open'", timeout=5)

        # Server restarting (1001): back within restartSpread, jittered.
        server.services.hub.close_all(1001, "server shutting down")
        close = await page.wait_for("window.client.lastClose && window.client.lastClose.code === 1001 "
                                    "&& window.client.lastClose")
        assert 0 <= close["delay"] < 300
        await page.wait_for("window.client.status === 'open'")

        # The policy itself, without the network: full jitter, capped.
        delays = await page.evaluate("[0, 1, 5, 20].map((a) => window.reconnectDelay(1006, a, "
                                     "{minDelay: 500, maxDelay: 30000}, () => 0.999999))")
        assert delays == [499, 999, 15999, 29999]
        assert await page.evaluate("window.reconnectDelay(1013, 0, {tryAgainLaterDelay: 15000}, () => 0)") == 15000
        statuses = [e["status"] for e in await page.evaluate("window.events")]
        assert statuses[:2] == ["connecting", "open"] and statuses.count("polling") == 2
    await server.shutdown()
