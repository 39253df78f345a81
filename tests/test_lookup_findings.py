"""The lookup findings of issue 10 over HTTP, against the whole server and the simulator.

Each failed on 023511a: an uncached price with the price API hanging took the price
client's own 10 s x 3 attempts (plus the app's second fetch) whatever
``upstream.request_timeout`` said, and a client's uncached price lookups had no share.
"""

from __future__ import annotations

import httpx
import trio
from solders.keypair import Keypair

from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


def _mint() -> str:
    return str(Keypair().pubkey())


async def test_uncached_price_with_the_api_hanging_is_504_within_the_timeout(nursery, sim):
    cfg = make_config(sim.url, state=FAR, upstream={"request_timeout": 1.0})
    server = await start_server(nursery, cfg)
    await wait_for(lambda: server.services.state.ready()[0])
    sim.world.reset_counters()
    sim.world.set_faults(latency=3600.0)  # the price API (and the RPC) accept and never answer
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        t0 = trio.current_time()
        with trio.fail_after(5):
            resp = await client.get(f"/api/price/{_mint()}")
        elapsed = trio.current_time() - t0
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "upstream_timeout"
    assert 1.0 <= elapsed < 2.0  # request_timeout + 1 s at most
    assert sim.world.counters()["price_requests"] == 1  # fetched once, not retried past the deadline
    sim.world.reset_faults()
    await server.shutdown()


async def test_a_clients_uncached_price_lookups_have_a_share(nursery, sim):
    cfg = make_config(sim.url, state=FAR)  # api.per_client_rps is off (the default)
    server = await start_server(nursery, cfg)
    await wait_for(lambda: server.services.state.ready()[0])
    token = f"/api/price/{cfg.token.mint}"
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as client:
        assert (await client.get(token)).status_code == 200  # one lookup: now in memory

        async def lookup(mint: str) -> None:
            resp = await client.get(f"/api/price/{mint}")
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                assert int(resp.headers["retry-after"]) >= 1 and resp.json()["error"]["code"] == "rate_limited"

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for _ in range(30):
                    n.start_soon(lookup, _mint())
        # A burst of 20 (2 s of the default 10 lookups/s), the token's included; the rest
        # 429 (11), less what refills at 10/s while the 30 requests arrive (real time).
        assert len(statuses) == 30 and 5 <= statuses.count(429) <= 11, statuses
        # A price already in memory costs nothing upstream: not charged, still served.
        assert (await client.get(token)).status_code == 200
    await server.shutdown()
