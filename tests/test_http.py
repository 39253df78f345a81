"""The frontend's HTTP API against the simulated upstream, over real sockets."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from solders.keypair import Keypair

from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
SECRET = "s3cr3t-k3y-value"


def new_key() -> str:
    return str(Keypair().pubkey())


@pytest.fixture
async def api(nursery, sim):
    cfg = make_config(
        sim.url,
        state=FAR,
        upstream={"rpc_url": [sim.url + f"/?api-key={SECRET}"], "ws_url": "ws" + sim.url[4:] + f"/?api-key={SECRET}",
                  "max_retries": 1, "request_timeout": 3.0},
        api={"max_wallets": 300, "max_body_bytes": 40_000},
        server={"allowed_origins": ["https://app.example"]},
    )
    server = await start_server(nursery, cfg)
    await wait_for(lambda: server.services.state.ready()[0])
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        client.server = server  # type: ignore[attr-defined]
        yield client
    await server.shutdown()


def assert_error(resp: httpx.Response, status: int, needle: str = "") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert needle in body["error"]["message"]
    assert "Traceback" not in resp.text and SECRET not in resp.text
    return body


async def test_state_routes_etag_and_304(api, sim):
    resp = await api.get("/api/state")
    assert resp.status_code == 200
    state = resp.json()
    assert state["jackpot"] == sim.world.jackpot / 1e9
    assert state["participants"] == sim.world.participant_count()
    assert state["tokenPrice"] == pytest.approx(0.042)
    assert isinstance(state["lastUpdate"], int)
    etag = resp.headers["etag"]
    assert etag.startswith('"') and "max-age=" in resp.headers["cache-control"]
    assert "public" in resp.headers["cache-control"] and "stale-while-revalidate" in resp.headers["cache-control"]
    cached = await api.get("/api/state", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b"" and "content-type" not in cached.headers
    lottery = (await api.get("/api/lottery/state")).json()
    assert set(lottery) >= {"jackpot", "jackpotLamports", "participants", "potAccount", "programId", "slot", "lastUpdate"}
    assert lottery["jackpotLamports"] == sim.world.jackpot
    count = (await api.get("/api/lottery/participants/count")).json()
    assert count["count"] == sim.world.participant_count()
    # A change gives a new ETag; the old one no longer matches.
    sim.world.set_jackpot(99_000_000_000)
    await wait_for(lambda: api.server.services.state.snapshot.jackpot == 99.0)
    fresh = await api.get("/api/state", headers={"If-None-Match": etag})
    assert fresh.status_code == 200 and fresh.json()["jackpot"] == 99.0


async def test_state_is_served_from_memory(api, sim):
    await wait_for(lambda: api.server.services.refresher.pubsub.up)
    await trio.sleep(0.3)  # let the start-up reads (one batch window) finish
    sim.world.reset_counters()
    for _ in range(50):
        assert (await api.get("/api/state")).status_code == 200
    assert sim.world.counters()["rpc_calls"] == 0


async def test_price_route(api, sim):
    mint = sim.world.token_mint
    body = (await api.get(f"/api/price/{mint}")).json()
    assert body["mint"] == mint and body["price"] == pytest.approx(0.042) and isinstance(body["lastUpdate"], int)
    assert_error(await api.get("/api/price/not-a-mint"), 400, "tokenMint")
    assert_error(await api.get(f"/api/price/{new_key()}"), 404)


async def test_concurrent_price_lookups_coalesce_and_batch(nursery, sim):
    # A long TTL: on a loaded machine the requests may take longer than the default 5 s.
    # (1,000 concurrent lookups without HTTP in between: tests/test_prices.py.)
    server = await start_server(nursery, make_config(sim.url, state=FAR, cache={"ttl": 120.0}))
    await wait_for(lambda: server.services.state.ready()[0])  # start-up reads done
    mints = [new_key() for _ in range(3)]
    for i, m in enumerate(mints):
        sim.world.set_price(m, 1.5 + i)
    sim.world.reset_counters()
    results: list[float] = []

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:

        async def one(mint: str) -> None:
            resp = await client.get(f"/api/price/{mint}")
            results.append(resp.json()["price"])

        async with trio.open_nursery() as n:
            for i in range(300):
                n.start_soon(one, mints[i % 3])
    assert sorted(set(results)) == [1.5, 2.5, 3.5] and len(results) == 300
    assert sim.world.counters()["price_requests"] == 1
    await server.shutdown()


async def test_balances_spl_token2022_and_missing(api, sim):
    spl, t22 = new_key(), new_key()
    sim.world.add_mint(spl, 6, "spl")
    sim.world.add_mint(t22, 9, "token-2022", extension_bytes=40)
    rich, poor, nobody = new_key(), new_key(), new_key()
    sim.world.set_token_balance(rich, spl, 12_500_000)
    sim.world.set_token_balance(poor, t22, 3_000_000_000)
    resp = await api.post("/api/tokens/balances", json={"wallets": [rich, nobody, rich], "tokenMint": spl})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"balances": {rich: 12.5, nobody: 0}}
    resp = await api.post("/api/tokens/balances", json={"wallets": [poor, nobody], "tokenMint": t22})
    assert resp.json() == {"balances": {poor: 3.0, nobody: 0}}


async def test_250_wallets_cost_3_account_reads_and_1_mint_read(api, sim):
    mint = new_key()
    sim.world.add_mint(mint, 6, "spl")
    wallets = [new_key() for _ in range(250)]
    for w in wallets[:10]:
        sim.world.set_token_balance(w, mint, 1_000_000)
    sim.world.reset_counters()
    resp = await api.post("/api/tokens/balances", json={"wallets": wallets, "tokenMint": mint})
    assert resp.status_code == 200
    balances = resp.json()["balances"]
    assert sum(balances.values()) == 10.0 and len(balances) == 250
    methods = sim.world.counters()["rpc_methods"]
    assert methods.get("getMultipleAccounts", 0) == 3 + 1 or (
        methods.get("getMultipleAccounts", 0) == 3 and methods.get("getAccountInfo", 0) == 1
    ), methods


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[]", 400, "JSON object"),
        (json.dumps({"wallets": "abc", "tokenMint": "x"}).encode(), 400, "wallets"),
        (json.dumps({"wallets": [], "tokenMint": 5}).encode(), 400, "tokenMint"),
        (json.dumps({"wallets": [new_key(), new_key(), new_key(), "0OIl"], "tokenMint": new_key()}).encode(), 400, "wallets[3]"),
        (json.dumps({"wallets": [new_key()] * 301, "tokenMint": new_key()}).encode(), 413, "at most 300"),
        (json.dumps({"wallets": ["x" * 50_000], "tokenMint": new_key()}).encode(), 413, "40000 bytes"),
        (json.dumps({"wallets": [new_key()], "tokenMint": new_key()}).encode(), 400, "tokenMint"),
    ],
)
async def test_balances_bad_input(api, body, status, needle):
    assert_error(await api.post("/api/tokens/balances", content=body, headers={"content-type": "application/json"}),
                 status, needle)


async def test_404_405_json(api):
    assert_error(await api.get("/nope"), 404, "/nope")
    resp = await api.post("/api/state")
    assert_error(resp, 405)
    assert "GET" in resp.headers["allow"]
    assert_error(await api.put("/api/lottery/state"), 405)
    pre = await api.options("/api/state", headers={"Origin": "https://app.example"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://app.example"
    assert_error(await api.delete("/api/tokens/balances"), 405)


async def test_upstream_failure_with_nothing_cached_is_502_or_504(api, sim):
    sim.world.set_faults(error_ratio=1.0)
    resp = await api.post("/api/tokens/balances", json={"wallets": [new_key()], "tokenMint": new_key()})
    assert_error(resp, 502)
    sim.world.set_faults(error_ratio=0.0, timeout_ratio=1.0)
    resp = await api.post("/api/tokens/balances", json={"wallets": [new_key()], "tokenMint": new_key()})
    assert resp.status_code in (502, 504)
    assert_error(resp, resp.status_code)


async def test_cors_and_preflight(api):
    resp = await api.get("/api/state", headers={"Origin": "https://app.example"})
    assert resp.headers["access-control-allow-origin"] == "https://app.example"
    resp = await api.get("/api/state", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in resp.headers
    pre = await api.options("/api/tokens/balances", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code in (200, 204)
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]


async def test_stats_metrics_and_no_secret_anywhere(api):
    await api.get("/api/state")
    stats = await api.get("/stats")
    doc = stats.json()
    for section in ("pool", "rate_limiter", "cache", "upstream", "state", "broadcaster", "api"):
        assert section in doc
    assert doc["api"]["requests"] >= 1
    metrics = await api.get("/metrics")
    assert metrics.status_code == 200
    families = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert "edgestate_ws_clients" in families
    assert "edgestate_http_requests" in families  # the parser names a counter without _total
    for resp in (stats, metrics, await api.get("/health"), await api.get("/ready")):
        assert SECRET not in resp.text
    assert "api-key=***" in stats.text


async def test_per_client_rate_limit(nursery, sim):
    server = await start_server(nursery, make_config(sim.url, state=FAR, api={"per_client_rps": 2.0}))
    async with httpx.AsyncClient(base_url=server.url) as client:
        statuses = [(await client.get("/api/state")).status_code for _ in range(10)]
        assert statuses.count(429) >= 5 and statuses[0] == 200
        limited = await client.get("/api/lottery/state")
        assert limited.status_code == 429 and limited.headers["retry-after"]
        assert (await client.get("/health")).status_code == 200  # not limited
    await server.shutdown()


async def test_overloaded_upstream_is_503_with_retry_after(nursery, sim):
    server = await start_server(nursery, make_config(sim.url, state=FAR, upstream={"max_queue": 1}))
    sim.world.set_faults(latency=0.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        mint = new_key()
        sim.world.add_mint(mint, 6)
        statuses = []

        async def one() -> None:
            resp = await client.post("/api/tokens/balances", json={"wallets": [new_key()], "tokenMint": mint})
            statuses.append(resp)

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        overloaded = [r for r in statuses if r.status_code == 503]
        assert overloaded, [r.status_code for r in statuses]
        assert overloaded[0].headers["retry-after"]
        assert_error(overloaded[0], 503)
    await server.shutdown()


async def test_balances_cached_per_wallet_and_mint(api, sim):
    mint = new_key()
    sim.world.add_mint(mint, 6, "spl")
    first = [new_key() for _ in range(5)]
    sim.world.set_token_balance(first[0], mint, 2_000_000)
    assert (await api.post("/api/tokens/balances", json={"wallets": first, "tokenMint": mint})).status_code == 200
    sim.world.reset_counters()
    # Same wallets again: answered from the cache, nothing upstream.
    again = await api.post("/api/tokens/balances", json={"wallets": first, "tokenMint": mint})
    assert again.json()["balances"][first[0]] == 2.0
    assert sim.world.counters()["rpc_calls"] == 0
    # Overlapping request: only the new wallet's account is read.
    newcomer = new_key()
    resp = await api.post("/api/tokens/balances", json={"wallets": [*first, newcomer], "tokenMint": mint})
    assert resp.json()["balances"][newcomer] == 0
    assert sim.world.counters()["rpc_calls"] == 1
