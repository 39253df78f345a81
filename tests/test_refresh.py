"""Refresher (issue 11): participants pushed, recounts, readiness that tells the truth."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from edgestate.refresh import Participants
from edgestate.sim import World, serve_simulator
from tests.conftest import make_config, start_server, wait_for

QUIET = {"polling_interval": 3600.0, "price_interval": 3600.0}


def gpa_calls(world: World) -> int:
    return int(world.counters()["rpc_methods"].get("getProgramAccounts", 0))


async def test_a_participant_joining_reaches_clients_within_a_second(nursery, sim, ws_connect) -> None:
    # Before issue 11 the count came from getProgramAccounts every participants_interval
    # (10 s), even with PubSub up: a join took up to 10 s, each read cost 10 credits.
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(sim.url, state=QUIET))
        refresher = server.services.refresher
        await wait_for(lambda: server.services.state.ready()[0] and refresher.pubsub.up)
        await wait_for(lambda: "participants" in refresher.stats()["synced_by_subscription"])
        client = await ws_connect(server.url)
        first = (await client.message())["state"]["participants"]
        assert first == sim.world.participant_count()
        calls = gpa_calls(sim.world)
        with trio.fail_after(1.0):
            sim.world.add_participants(1)
            assert (await client.message())["state"]["participants"] == first + 1
            sim.world.add_participants(2)
            while (await client.message())["state"]["participants"] != first + 3:
                pass
        await trio.sleep(1.0)
        assert gpa_calls(sim.world) == calls  # pushed: no getProgramAccounts between reconciliations
        stats = refresher.stats()
        assert stats["participants_source"] == "push" and stats["participants"]["pushes"] >= 3
        assert stats["pubsub"]["subscriptions"] == ["pot", "participants"]
        assert sim.world.counters()["ws_connections_active"] == 1  # one connection carries both
        await server.shutdown()


async def test_recount_at_reconcile_interval_catches_closed_accounts(nursery, sim) -> None:
    with trio.fail_after(15):
        cfg = make_config(sim.url, state={**QUIET, "participants_reconcile_interval": 1.0})
        server = await start_server(nursery, cfg)
        refresher = server.services.refresher
        await wait_for(lambda: server.services.state.ready()[0] and refresher.pubsub.up)
        before = server.services.state.snapshot.participants
        sim.world.remove_participants(2)  # closed accounts are not notified
        await wait_for(lambda: server.services.state.snapshot.participants == before - 2, timeout=5)
        assert refresher.participants.recounts >= 2
        await server.shutdown()


async def test_participants_polled_while_pubsub_is_down(nursery, sim) -> None:
    with trio.fail_after(15):
        cfg = make_config(sim.url, state={**QUIET, "participants_interval": 0.3})
        sim.world.set_faults(refuse_ws=True)
        server = await start_server(nursery, cfg)
        await wait_for(lambda: server.services.state.snapshot.participants is not None)
        calls = gpa_calls(sim.world)
        sim.world.add_participants(1)
        await wait_for(lambda: server.services.state.snapshot.participants == sim.world.participant_count())
        assert gpa_calls(sim.world) > calls
        assert server.services.refresher.stats()["participants_source"] == "poll"
        await server.shutdown()


async def test_a_quiet_pot_stays_ready_while_its_subscription_lives(nursery, sim) -> None:
    # Measured before issue 11: with PubSub up and the pot unchanged, /ready went 503
    # ("jackpot older than state.max_staleness") once max_staleness passed.
    with trio.fail_after(15):
        cfg = make_config(sim.url, state={"max_staleness": 1.5, "price_interval": 0.3,
                                          "participants_reconcile_interval": 3600.0},
                          ws={"ping_interval": 0.3})
        server = await start_server(nursery, cfg)
        await wait_for(lambda: server.services.state.ready()[0] and server.services.refresher.pubsub.up)
        for _ in range(12):  # 3 s, twice max_staleness, nothing changes on chain
            await trio.sleep(0.25)
            assert server.services.state.ready() == (True, ""), server.services.state.ready()
        # The subscription dies (and cannot come back): the values age as they should.
        sim.world.set_faults(refuse_ws=True)
        sim.world.drop_ws()
        await wait_for(lambda: not server.services.state.ready()[0], timeout=5)
        assert "jackpot" in server.services.state.ready()[1] or "participants" in server.services.state.ready()[1]
        await server.shutdown()


async def test_an_unknown_price_is_not_ready(nursery) -> None:
    # The devnet default mint on mainnet, for one: Jupiter has no price; the state said
    # tokenPrice null and /ready 200.
    cfg = make_config(None)
    world = World.from_config(cfg, price=None)
    url = await nursery.start(serve_simulator, world)
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(url, state={"price_interval": 0.3}))
        await wait_for(lambda: server.services.refresher.polls["tokenPrice"] >= 1 and
                       server.services.state.field("jackpot") is not None)
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            await wait_for(lambda: server.services.state.field("tokenPrice") is not None)
            r = await client.get("/ready")
            assert r.status_code == 503
            assert "tokenPrice" in r.json()["stale"] and "no price" in r.json()["reason"]
            assert (await client.get("/api/state")).json()["tokenPrice"] is None
            world.set_price(world.token_mint, 0.5)
            await wait_for(lambda: server.services.state.ready()[0])
            assert (await client.get("/ready")).status_code == 200
        await server.shutdown()


async def test_a_missing_pot_is_not_a_jackpot_of_zero(nursery, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(None)
    world = World.from_config(cfg, pot=False)
    url = await nursery.start(serve_simulator, world)
    with trio.fail_after(15):
        server = await start_server(nursery, make_config(url, state={"price_interval": 0.3}))
        state = server.services.state
        await wait_for(lambda: state.field("jackpot") is not None and state.field("participants") is not None)
        ok, reason = state.ready()
        assert not ok and "does not exist" in reason and state.snapshot.jackpot is None
        assert "lottery.pot_account" in caplog.text and "does not exist" in caplog.text
        world.set_jackpot(3_000_000_000)  # the pot appears: pushed, ready
        await wait_for(lambda: state.ready()[0])
        assert state.snapshot.jackpot == 3.0
        await server.shutdown()


# ---- the participant set, without sockets ------------------------------------------------


def test_recount_keeps_pushes_newer_than_its_slot() -> None:
    p = Participants()
    assert p.count is None and not p.pushed("a", 5, 10)  # no base yet
    token = p.recount_started()
    p.pushed("b", 5, 12)  # after the request: newer than the answer's slot
    p.pushed("c", 0, 12)  # closed after the answer's slot
    p.recounted(frozenset({"a", "c", "x"}), 11, token)
    assert p.keys == {"a", "b", "x"} and p.slot == 12
    assert p.pushed("d", 1, 13) and p.count == 4
    assert not p.pushed("d", 2, 14)  # an update of a known participant: same count


def test_recount_without_slot_orders_by_arrival() -> None:
    p = Participants()
    p.pushed("early", 5, 0)
    token = p.recount_started()
    p.pushed("late", 5, 0)
    p.recounted(frozenset({"x"}), 0, token)  # a provider that ignored withContext
    assert p.keys == {"x", "late"}  # "early" was before the request: the answer is right


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.booleans()), max_size=40), st.integers(0, 40))
def test_pushes_then_recount_match_the_chain(events: list[tuple[str, bool]], cut: int) -> None:
    # A model chain: a join is pushed, a close is not. The set always contains the chain's
    # participants after a recount, whatever the pushes around it.
    chain: set[str] = set()
    p = Participants()
    slot = 0
    token = p.recount_started()
    p.recounted(frozenset(chain), slot, token)
    for i, (key, join) in enumerate(events):
        slot += 1
        if i == cut:
            token = p.recount_started()
            p.recounted(frozenset(chain), slot, token)
        if join:
            chain.add(key)
            p.pushed(key, 1, slot)
        else:
            chain.discard(key)  # closed: no notification
    assert chain <= (p.keys or set())
    token = p.recount_started()
    p.recounted(frozenset(chain), slot + 1, token)
    assert p.keys == chain
