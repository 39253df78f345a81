"""The simulator behaves like the real providers where issue 11 found we relied on it not to:
agave's default encodings and limits, programSubscribe, 413s, refused batches, -32005, 403,
Helius's idle close and connection cap, no price for a mint nobody priced."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from solders.pubkey import Pubkey
from solders.rpc.responses import GetAccountInfoResp, GetProgramAccountsResp

from edgestate.sim import World, serve_simulator
from edgestate.sim.world import b58decode, b58encode
from tests.test_sim import FILTERS, WALLET, make_world, open_ws, rpc


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
async def url(world: World, nursery: trio.Nursery) -> str:
    return await nursery.start(serve_simulator, world)


@pytest.fixture
async def client(url: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        yield c


async def test_agave_default_encodings(world: World, client: httpx.AsyncClient) -> None:
    # getAccountInfo / getProgramAccounts default to "binary": a bare base58 string.
    mint = (await rpc(client, "getAccountInfo", world.token_mint))["result"]["value"]
    assert isinstance(mint["data"], str) and len(b58decode(mint["data"])) == 82
    GetAccountInfoResp.from_json(json.dumps(await rpc(client, "getAccountInfo", world.token_mint)))
    gpa = (await rpc(client, "getProgramAccounts", world.program_id, {"filters": FILTERS}))["result"]
    assert gpa and all(isinstance(item["account"]["data"], str) for item in gpa)
    GetProgramAccountsResp.from_json(json.dumps({"jsonrpc": "2.0", "id": 1, "result": gpa}))
    # getMultipleAccounts defaults to base64.
    gma = (await rpc(client, "getMultipleAccounts", [world.token_mint]))["result"]["value"][0]
    assert gma["data"][1] == "base64" and len(base64.b64decode(gma["data"][0])) == 82
    b58 = (await rpc(client, "getAccountInfo", world.token_mint, {"encoding": "base58"}))["result"]["value"]
    assert b58["data"][1] == "base58" and b58decode(b58["data"][0]) == world.accounts[world.token_mint].data


async def test_base58_stops_at_128_bytes(world: World, client: httpx.AsyncClient) -> None:
    big = str(Pubkey.new_unique())
    world.set_account(big, 1, str(Pubkey.new_unique()), b"\x01" * 129)
    for encoding in (None, "base58"):
        config = {"encoding": encoding} if encoding else {}
        error = (await rpc(client, "getAccountInfo", big, config))["error"]
        assert error["code"] == -32600 and "128 bytes" in error["message"]
    sliced = await rpc(client, "getAccountInfo", big, {"dataSlice": {"offset": 0, "length": 128}})
    assert len(b58decode(sliced["result"]["value"]["data"])) == 128
    assert (await rpc(client, "getAccountInfo", big, {"encoding": "base64"}))["result"]["value"]["space"] == 129


async def test_json_parsed_with_data_slice_is_refused(world: World, client: httpx.AsyncClient) -> None:
    config = {"encoding": "jsonParsed", "dataSlice": {"offset": 0, "length": 0}}
    for method, arg in (("getAccountInfo", world.token_mint), ("getMultipleAccounts", [world.token_mint]),
                        ("getProgramAccounts", world.program_id)):
        error = (await rpc(client, method, arg, config))["error"]
        assert error["code"] == -32600 and "Sliced account data" in error["message"]


async def test_memcmp_bytes_at_most_128(world: World, client: httpx.AsyncClient) -> None:
    ok = {"memcmp": {"offset": 0, "bytes": b58encode(b"\x01" * 128)}}
    assert "result" in await rpc(client, "getProgramAccounts", world.program_id, {"filters": [ok], "encoding": "base64"})
    for flt in ({"memcmp": {"offset": 0, "bytes": b58encode(b"\x01" * 129)}},
                {"memcmp": {"offset": 0, "bytes": base64.b64encode(b"\x01" * 129).decode(), "encoding": "base64"}}):
        error = (await rpc(client, "getProgramAccounts", world.program_id, {"filters": [flt]}))["error"]
        assert error["code"] == -32602 and "DataTooLarge" in error["message"]


async def test_bodies_over_50_kib_get_413(world: World, client: httpx.AsyncClient) -> None:
    item = {"jsonrpc": "2.0", "id": 1, "method": "getMultipleAccounts", "params": [[WALLET] * 100, {"encoding": "base64"}]}
    body = json.dumps([{**item, "id": i} for i in range(11)])  # ~53 KB, as issue 11 measured
    assert len(body) > 51200
    with trio.fail_after(10):
        r = await client.post("/", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413
        ten = json.dumps([{**item, "id": i} for i in range(10)])
        assert (await client.post("/", content=ten, headers={"content-type": "application/json"})).status_code == 200
    assert world.counters()["http_413"] == 1


async def test_refuse_batches_mode(world: World, client: httpx.AsyncClient) -> None:
    world.set_faults(refuse_batches=True)
    with trio.fail_after(10):
        r = await client.post("/", json=[{"jsonrpc": "2.0", "id": 1, "method": "getSlot"}] * 2)
        assert r.status_code == 200 and r.json()["error"]["code"] == -32600 and r.json()["id"] is None
        assert "result" in await rpc(client, "getSlot")  # single calls still work


async def test_node_behind_and_forbidden_modes(world: World, client: httpx.AsyncClient) -> None:
    world.set_faults(node_behind=42)
    error = (await rpc(client, "getHealth"))["error"]
    assert error == {"code": -32005, "message": "Node is behind by 42 slots", "data": {"numSlotsBehind": 42}}
    world.set_faults(node_behind=0, forbidden=True)
    with trio.fail_after(10):
        r = await client.post("/", json={"jsonrpc": "2.0", "id": 1, "method": "getSlot"})
    assert r.status_code == 403
    world.reset_faults()
    assert world.faults()["max_body_bytes"] == 51200 and world.faults()["ws_idle_timeout"] == 600


async def test_no_price_for_a_mint_nobody_priced(nursery: trio.Nursery) -> None:
    from edgestate.config import from_dict

    world = World.from_config(from_dict({}, environ={}), price=None)
    url = await nursery.start(serve_simulator, world)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            body = (await client.get("/price/v3", params={"ids": world.token_mint})).json()
    assert body == {}


async def test_program_subscribe_pushes_joins_not_closes(world: World, url: str) -> None:
    with trio.fail_after(10):
        async with open_ws(url) as ws:
            config = {"encoding": "base64", "filters": FILTERS, "dataSlice": {"offset": 0, "length": 0}}
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "programSubscribe",
                                              "params": [world.program_id, config]}))
            sub = json.loads(await ws.get_message())["result"]
            (joined,) = world.add_participants(1)
            note = json.loads(await ws.get_message())
            assert note["method"] == "programNotification" and note["params"]["subscription"] == sub
            value = note["params"]["result"]["value"]
            assert value["pubkey"] == joined and value["account"]["data"] == ["", "base64"]
            assert value["account"]["lamports"] > 0
            # A non-matching account of the program and a closed participant: no notification.
            world.set_account(str(Pubkey.new_unique()), 5, world.program_id, b"\x00" * 10)
            world.remove_participants(1)
            (second,) = world.add_participants(1)
            note = json.loads(await ws.get_message())
            assert note["params"]["result"]["value"]["pubkey"] == second
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "programUnsubscribe",
                                              "params": [sub]}))
            assert json.loads(await ws.get_message())["result"] is True


async def test_account_subscribe_default_is_binary_and_big_data_is_an_error_string(world: World, url: str) -> None:
    big = str(Pubkey.new_unique())
    world.set_account(big, 1, str(Pubkey.new_unique()), b"\x02" * 200)
    with trio.fail_after(10):
        async with open_ws(url) as ws:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "accountSubscribe", "params": [big]}))
            await ws.get_message()
            world.set_account(big, 2, world.accounts[big].owner, b"\x02" * 200)
            note = json.loads(await ws.get_message())
            assert note["params"]["result"]["value"]["data"] == "error: data too large for bs58 encoding"


async def test_idle_socket_closed_unless_the_client_pings(nursery: trio.Nursery) -> None:
    world = make_world()
    world.set_faults(ws_idle_timeout=0.6)
    url = await nursery.start(serve_simulator, world)
    with trio.fail_after(10):
        async with open_ws(url) as quiet, open_ws(url) as pinging:
            t0 = trio.current_time()
            for _ in range(8):  # 1.2 s of pings every 0.15 s
                await trio.sleep(0.15)
                await pinging.ping()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await quiet.get_message()
            assert closed.value.reason.code == 1000 and trio.current_time() - t0 < 1.5
            assert not pinging.closed  # pings are activity, as on Helius
    assert world.counters()["ws_idle_closed"] == 1


async def test_websocket_connection_cap(nursery: trio.Nursery) -> None:
    world = make_world()
    world.set_faults(max_ws_connections=2)
    url = await nursery.start(serve_simulator, world)
    with trio.fail_after(10):
        async with open_ws(url), open_ws(url):
            with pytest.RaisesGroup(trio_websocket.ConnectionRejected,
                                    check=lambda g: g.exceptions[0].status_code == 429):
                async with open_ws(url):
                    pass  # pragma: no cover
    assert world.counters()["ws_connections_peak"] == 2
