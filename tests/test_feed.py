"""Feed mode: children following a parent edgestate (issue 7), in one process."""

from __future__ import annotations

import httpx
import pytest
import trio
from solders.keypair import Keypair

from edgestate import config
from edgestate.errors import ConfigError
from edgestate.feed import Parent, ParentFeed
from edgestate.metrics import collect, prometheus_text
from edgestate.state import SharedState
from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


def new_key() -> str:
    return str(Keypair().pubkey())


async def ready_root(nursery, sim, **sections):
    sections.setdefault("state", FAR)
    root = await start_server(nursery, make_config(sim.url, **sections))
    await wait_for(lambda: root.services.state.ready()[0] and root.services.refresher.pubsub.up)
    return root


async def start_child(nursery, parent, **sections):
    upstream = {"parent": parent, **sections.pop("upstream", {})}
    child = await start_server(nursery, make_config(None, upstream=upstream, **sections))
    return child


def ws_of(server) -> str:
    return "ws" + server.url[4:] + "/ws"


# -- units ------------------------------------------------------------------------------


def test_parent_urls():
    assert Parent.from_url("ws://root:8080/ws") == Parent("ws://root:8080/ws", "http://root:8080")
    assert Parent.from_url("http://root:8080") == Parent("ws://root:8080/ws", "http://root:8080")
    assert Parent.from_url("https://edge.example/es/") == Parent("wss://edge.example/es/ws", "https://edge.example/es")
    assert Parent.from_url("wss://edge.example/es/ws") == Parent("wss://edge.example/es/ws", "https://edge.example/es")


def test_parent_config_is_validated_and_redacted():
    cfg = config.from_dict({"upstream": {"parent": "ws://root:8080/ws?token=s3cr3t"}}, environ={})
    assert cfg.upstream.parent == ("ws://root:8080/ws?token=s3cr3t",)
    assert "s3cr3t" not in config.to_toml(cfg)
    cfg = config.from_dict({}, environ={"EDGESTATE_UPSTREAM_PARENT": '["http://a:1", "http://b:2"]'})
    assert cfg.upstream.parent == ("http://a:1", "http://b:2")
    with pytest.raises(ConfigError, match="upstream.parent"):
        config.from_dict({"upstream": {"parent": "ftp://root"}}, environ={})
    with pytest.raises(ConfigError, match="server.workers"):
        config.from_dict({"server": {"workers": 0}}, environ={})


async def test_apply_orders_converts_and_respects_parent_staleness():
    cfg = make_config(None, upstream={"parent": "ws://root:1/ws"})
    state = SharedState(cfg)
    feed = ParentFeed(cfg, state)
    feed.apply({"tokenPrice": None, "jackpot": None, "participants": None, "version": 1, "slot": 5, "stale": True},
               first=True)
    assert state.stale_fields() == ["tokenPrice", "jackpot", "participants"]  # nothing confirmed
    feed.apply({"tokenPrice": 0.5, "jackpot": 12.345678901, "participants": 7, "version": 2, "slot": 10,
                "stale": False})
    assert state.snapshot.jackpot_lamports == 12_345_678_901
    assert state.snapshot.slot == 10 and state.ready()[0]
    # A fallback parent a few slots behind is adopted on its first message.
    feed.apply({"tokenPrice": 0.6, "jackpot": 1.0, "participants": 7, "version": 1, "slot": 8, "stale": False},
               first=True)
    assert state.snapshot.token_price == 0.6 and state.snapshot.slot == 8
    # A stale parent's unchanged values are not re-confirmed here; changed ones are taken.
    before = state.field("participants")
    feed.apply({"tokenPrice": 0.7, "jackpot": 1.0, "participants": 7, "version": 2, "slot": 9, "stale": True})
    assert state.field("participants") is before
    assert state.snapshot.token_price == 0.7


# -- end to end -----------------------------------------------------------------------


async def test_child_follows_parent_to_its_websocket_clients(nursery, sim, ws_connect):
    with trio.fail_after(10):
        root = await ready_root(nursery, sim)
        child = await start_child(nursery, ws_of(root))
        await wait_for(lambda: child.services.feed.connected and child.services.state.ready()[0])
        client = await ws_connect(child.url)  # closed at teardown
        first = (await client.message())["state"]
        assert first["jackpot"] == sim.world.jackpot / 1e9 and first["stale"] is False
        sim.world.set_jackpot(77_123_456_789)
        update = (await client.message())["state"]
        assert update["jackpot"] == 77.123456789
        assert child.services.state.snapshot.jackpot_lamports == 77_123_456_789
        assert update["slot"] == root.services.state.snapshot.slot
        doc = collect(child.services)
        assert doc["feed"]["connected"] is True and doc["feed"]["updates_applied"] >= 2
        assert doc["pool"] == {"mode": "feed"}
        assert b"edgestate_feed_connected 1.0" in prometheus_text(child.services)
        assert child.services.pool is None and child.services.refresher is None
        await client.aclose()
        await child.shutdown()
        await root.shutdown()


async def test_ten_children_cost_the_providers_what_one_node_costs(nursery, sim):
    fast = {"polling_interval": 3600.0, "participants_interval": 0.5, "price_interval": 0.5}
    with trio.fail_after(15):
        root = await ready_root(nursery, sim, state=fast, cache={"ttl": 5.0})
        sim.world.reset_counters()
        await trio.sleep(1.5)
        alone = sim.world.counters()

        children = [await start_child(nursery, root.url) for _ in range(10)]
        await wait_for(lambda: all(c.services.feed.connected for c in children))
        sim.world.reset_counters()
        await trio.sleep(1.5)
        with_children = sim.world.counters()
        # The children add no provider traffic at all (polling jitter aside).
        assert with_children["rpc_calls"] <= alone["rpc_calls"] + 2, (alone, with_children)
        assert with_children["ws_connections_total"] == 0
        assert with_children["price_requests"] <= alone["price_requests"] + 2
        for child in children:
            await child.shutdown()
        await root.shutdown()


async def test_ten_children_asking_one_price_cost_one_request(nursery, sim):
    with trio.fail_after(10):
        root = await ready_root(nursery, sim)
        children = [await start_child(nursery, root.url) for _ in range(10)]
        await wait_for(lambda: all(c.services.feed.connected for c in children))
        # Each child asks its parent once per mint within the TTL, however many clients
        # ask it; the parent asks the price API once for all of them.
        mint = new_key()
        sim.world.set_price(mint, 1.25)
        sim.world.reset_counters()
        answers = []

        async def ask(client: httpx.AsyncClient) -> None:
            answers.append((await client.get(f"/api/price/{mint}")).json()["price"])

        clients = [httpx.AsyncClient(base_url=c.url, timeout=5) for c in children]
        try:
            async with trio.open_nursery() as askers:
                for client in clients:
                    for _ in range(5):
                        askers.start_soon(ask, client)
        finally:
            for client in clients:
                await client.aclose()
        assert answers == [1.25] * 50
        assert [c.services.feed.forwarded for c in children] == [1] * 10
        assert sim.world.counters()["price_requests"] == 1
        for child in children:
            await child.shutdown()
        await root.shutdown()


async def test_lookups_forwarded_with_errors_mapped(nursery, sim):
    with trio.fail_after(10):
        root = await ready_root(nursery, sim)
        child = await start_child(nursery, root.url)
        await wait_for(lambda: child.services.feed.connected)
        mint, rich, nobody = new_key(), new_key(), new_key()
        sim.world.add_mint(mint, 6, "spl")
        sim.world.set_token_balance(rich, mint, 12_500_000)
        async with httpx.AsyncClient(base_url=child.url, timeout=5) as api:
            resp = await api.post("/api/tokens/balances", json={"wallets": [rich, nobody], "tokenMint": mint})
            assert resp.status_code == 200 and resp.json() == {"balances": {rich: 12.5, nobody: 0}}
            resp = await api.post("/api/tokens/balances", json={"wallets": [rich], "tokenMint": new_key()})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_mint"
            resp = await api.get(f"/api/price/{new_key()}")  # the price API has none
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "no_price"
            await root.shutdown()
            await wait_for(lambda: not child.services.feed.connected)
            resp = await api.get(f"/api/price/{new_key()}")  # parent gone, nothing cached
            assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error"
        await child.shutdown()


async def test_parent_restart_children_serve_stale_then_recover(nursery, sim, ws_connect):
    polls = {"polling_interval": 3600.0, "participants_interval": 0.5, "price_interval": 0.5}
    with trio.fail_after(15):
        root = await ready_root(nursery, sim, state=polls)
        port = root.url.rsplit(":", 1)[1]
        children = [
            await start_child(nursery, root.url, state={"max_staleness": 2.0})
            for _ in range(3)
        ]
        await wait_for(lambda: all(c.services.feed.connected and c.services.state.ready()[0] for c in children))
        client = await ws_connect(children[0].url)
        assert (await client.message())["state"]["stale"] is False

        await root.shutdown()
        await wait_for(lambda: not any(c.services.feed.connected for c in children))
        # Still serving the last state, then stale: /ready says so, clients are told.
        async with httpx.AsyncClient(base_url=children[0].url, timeout=5) as api:
            assert (await api.get("/api/state")).json()["jackpot"] == sim.world.jackpot / 1e9
            assert (await client.message())["state"]["stale"] is True
            resp = await api.get("/ready")
            assert resp.status_code == 503 and set(resp.json()["stale"]) == {"tokenPrice", "jackpot", "participants"}

            sim.world.set_jackpot(5_000_000_000)  # changed while the parent was away
            root = await ready_root(nursery, sim, state=polls, server={"bind": f"127.0.0.1:{port}"})
            await wait_for(lambda: all(c.services.state.ready()[0] for c in children), timeout=8)
            state = (await client.message())["state"]
            while state["stale"] or state["jackpot"] != 5.0:
                state = (await client.message())["state"]
            assert (await api.get("/ready")).status_code == 200
        await client.aclose()
        assert all(c.services.feed.reconnects >= 1 for c in children)
        for child in children:
            await child.shutdown()
        await root.shutdown()


async def test_fallback_to_the_next_parent(nursery, sim):
    with trio.fail_after(10):
        root = await ready_root(nursery, sim)
        with trio.socket.socket() as s:  # a port with nobody listening
            await s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        child = await start_child(nursery, [dead, ws_of(root)])
        await wait_for(lambda: child.services.feed.connected)
        assert child.services.feed.parent.ws_url == ws_of(root)
        assert child.services.state.snapshot.jackpot_lamports == sim.world.jackpot
        assert child.services.feed.stats()["last_error"]
        await child.shutdown()
        await root.shutdown()
