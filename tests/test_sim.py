"""The simulated upstream: RPC shapes (checked with solders' own parsers), PubSub,
the price API, fault knobs, the control API and the counters benchmarks read."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio_websocket
from solders.pubkey import Pubkey
from solders.rpc.responses import (
    AccountNotification,
    GetAccountInfoResp,
    GetBalanceResp,
    GetMultipleAccountsResp,
    GetProgramAccountsWithContextResp,
    GetTokenAccountBalanceResp,
    SlotNotification,
    parse_notification,
)
from solders.token.associated import get_associated_token_address
from solders.token.state import Mint, TokenAccount

from edgestate.config import from_dict
from edgestate.sim import World, run_demo_drift, serve_simulator
from edgestate.sim.world import TOKEN_2022_PROGRAM, TOKEN_PROGRAM, b58decode, b58encode

TAG = b58encode(b"LOTTO")
FILTERS = [{"dataSize": 96}, {"memcmp": {"offset": 8, "bytes": TAG}}]
WALLET = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"


def make_world(**kw: Any) -> World:
    cfg = from_dict({"lottery": {"participant_filters": FILTERS}}, environ={})
    return World.from_config(cfg, **kw)


@pytest.fixture
def world() -> World:
    # A frozen clock for the rate limiters keeps 429 tests independent of machine speed.
    return make_world(clock=lambda: 0.0)


@pytest.fixture
async def url(world: World, nursery: trio.Nursery) -> str:
    return await nursery.start(serve_simulator, world)


@pytest.fixture
async def client(url: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        yield c


async def rpc(client: httpx.AsyncClient, method: str, *params: Any, req_id: Any = 1) -> dict[str, Any]:
    with trio.fail_after(10):
        r = await client.post("/", json={"jsonrpc": "2.0", "id": req_id, "method": method, "params": list(params)})
    assert r.status_code == 200
    return r.json()


# ---- the world, without sockets ----


def test_base58_roundtrip() -> None:
    for raw in (b"", b"\0\0abc", bytes(range(32))):
        assert b58decode(b58encode(raw)) == raw
    assert b58encode(bytes(Pubkey.from_string(WALLET))) == WALLET


def test_layouts_are_real_spl_layouts(world: World) -> None:
    mint = world.accounts[world.token_mint]
    assert mint.owner == TOKEN_PROGRAM and len(mint.data) == 82
    assert Mint.from_bytes(mint.data).decimals == 6
    ata = world.set_token_balance(WALLET, world.token_mint, 1_234_567)
    wallet, mint_key = Pubkey.from_string(WALLET), Pubkey.from_string(world.token_mint)
    assert ata == str(get_associated_token_address(wallet, mint_key, Pubkey.from_string(TOKEN_PROGRAM)))
    parsed = TokenAccount.from_bytes(world.accounts[ata].data)
    assert (parsed.amount, parsed.owner, parsed.mint) == (1_234_567, wallet, mint_key)
    assert world.token_balance(ata) == (1_234_567, 6)


def test_token_2022_accounts_are_longer(world: World) -> None:
    mint = str(Pubkey.new_unique())
    world.add_mint(mint, 9, "token-2022", extension_bytes=40)
    data = world.accounts[mint].data
    assert world.accounts[mint].owner == TOKEN_2022_PROGRAM
    assert len(data) == 165 + 1 + 40 and data[165] == 1
    assert Mint.from_bytes(data[:82]).decimals == 9
    ata = world.set_token_balance(WALLET, mint, 5)
    assert ata == str(
        get_associated_token_address(Pubkey.from_string(WALLET), Pubkey.from_string(mint), Pubkey.from_string(TOKEN_2022_PROGRAM))
    )
    assert len(world.accounts[ata].data) == 170  # account type + ImmutableOwner
    assert TokenAccount.from_bytes(world.accounts[ata].data[:165]).amount == 5
    with pytest.raises(ValueError, match="unknown mint"):
        world.set_token_balance(WALLET, WALLET, 1)


def test_participants_and_filters(world: World) -> None:
    assert world.participant_count() == 42
    owned = world.program_accounts(world.program_id)
    assert len(owned) > 42  # non-matching accounts exist, so the filters matter
    slot = world.slot
    keys = world.add_participants(3)
    assert len(keys) == 3 and world.participant_count() == 45 and world.slot == slot + 1
    no_filters = World.from_config(from_dict({}, environ={}), participants=7)
    assert no_filters.participant_count() == len(no_filters.program_accounts(no_filters.program_id)) == 7
    for filters in ([{"dataSize": 80}], [{"memcmp": {"offset": 0, "bytes": "2"}}]):
        other = World.from_config(from_dict({"lottery": {"participant_filters": filters}}, environ={}), participants=5)
        assert other.participant_count() == 5 < len(other.program_accounts(other.program_id))


def test_jackpot_and_faults_validation(world: World) -> None:
    assert world.jackpot == 12_500_000_000
    assert world.add_jackpot(-13_000_000_000) == 0
    with pytest.raises(ValueError, match="unknown fault knob"):
        world.set_faults(latencyy=1)
    with pytest.raises(ValueError, match="<= 1"):
        world.set_faults(error_ratio=0.6, timeout_ratio=0.6)
    assert world.faults()["error_ratio"] == 0.0  # all-or-nothing
    world.set_faults(error_ratio=0.5)
    draws = [world.pick_fault() for _ in range(200)]
    assert 60 < draws.count("error") < 140 and set(draws) == {"error", None}
    again = make_world()
    again.set_faults(error_ratio=0.5)
    assert [again.pick_fault() for _ in range(200)] == draws  # seeded: deterministic


async def test_demo_drift(world: World, autojump_clock: trio.abc.Clock) -> None:
    slot, participants = world.slot, world.participant_count()
    with trio.move_on_after(30):
        await run_demo_drift(world, interval=1.0, rng=random.Random(1))
    assert world.slot >= slot + 29
    assert world.participant_count() > participants
    assert world.jackpot == 12_500_000_000 + (world.participant_count() - participants) * 100_000_000
    assert 0.0042 <= world.prices[world.token_mint] <= 0.42


# ---- JSON-RPC over HTTP ----


async def test_balance_and_account_info(world: World, client: httpx.AsyncClient) -> None:
    reply = await rpc(client, "getBalance", world.pot_account, {"commitment": "confirmed"})
    parsed = GetBalanceResp.from_json(json.dumps(reply))
    assert parsed.value == 12_500_000_000 and parsed.context.slot == world.slot
    reply = await rpc(client, "getAccountInfo", world.token_mint, {"encoding": "base64"})
    info = GetAccountInfoResp.from_json(json.dumps(reply))
    assert info.value is not None and str(info.value.owner) == TOKEN_PROGRAM
    assert Mint.from_bytes(info.value.data).decimals == 6
    assert reply["result"]["value"]["space"] == 82
    sliced = await rpc(client, "getAccountInfo", world.token_mint, {"encoding": "base64", "dataSlice": {"offset": 44, "length": 1}})
    assert base64.b64decode(sliced["result"]["value"]["data"][0]) == bytes([6])
    missing = await rpc(client, "getAccountInfo", str(Pubkey.new_unique()), {"encoding": "base64"})
    assert missing["result"]["value"] is None
    assert (await rpc(client, "getHealth"))["result"] == "ok"
    assert (await rpc(client, "getSlot"))["result"] == world.slot


async def test_batch_keeps_ids_and_counts_items(world: World, client: httpx.AsyncClient) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "getBalance", "params": [world.pot_account]},
        {"jsonrpc": "2.0", "id": 7, "method": "getBalance", "params": [WALLET]},
        {"jsonrpc": "2.0", "id": 8, "method": "getSlot"},
        {"jsonrpc": "2.0", "id": 9, "method": "nope"},
        {"id": 10},
    ]
    with trio.fail_after(10):
        reply = (await client.post("/", json=batch)).json()
    assert [item["id"] for item in reply] == ["a", 7, 8, 9, 10]
    assert reply[0]["result"]["value"] == 12_500_000_000 and reply[1]["result"]["value"] == 0
    assert reply[3]["error"]["code"] == -32601 and reply[4]["error"]["code"] == -32600
    counters = world.counters()
    assert counters["rpc_methods"] == {"getBalance": 2, "getSlot": 1, "nope": 1}
    assert (counters["rpc_requests"], counters["rpc_batches"], counters["rpc_calls"], counters["rpc_errors"]) == (1, 1, 4, 2)
    world.reset_counters()
    assert world.counters()["rpc_calls"] == 0 and world.counters()["rpc_methods"] == {}


async def test_multiple_accounts_and_limit(world: World, client: httpx.AsyncClient) -> None:
    ata = world.set_token_balance(WALLET, world.token_mint, 42)
    keys = [world.pot_account, str(Pubkey.new_unique()), ata]
    reply = await rpc(client, "getMultipleAccounts", keys, {"encoding": "base64"})
    parsed = GetMultipleAccountsResp.from_json(json.dumps(reply))
    pot, none, token = parsed.value
    assert pot is not None and pot.lamports == 12_500_000_000 and none is None
    assert token is not None and TokenAccount.from_bytes(token.data).amount == 42
    too_many = await rpc(client, "getMultipleAccounts", [WALLET] * 101, {"encoding": "base64"})
    assert too_many["error"]["code"] == -32602 and "max 100" in too_many["error"]["message"]
    bad = await rpc(client, "getMultipleAccounts", [WALLET, "not-a-key"])
    assert bad["error"] == {"code": -32602, "message": "Invalid param: Invalid"}


async def test_program_accounts_filters(world: World, client: httpx.AsyncClient) -> None:
    config = {"encoding": "base64", "filters": FILTERS, "dataSlice": {"offset": 0, "length": 0}, "withContext": True}
    reply = await rpc(client, "getProgramAccounts", world.program_id, config)
    parsed = GetProgramAccountsWithContextResp.from_json(json.dumps(reply))
    assert len(parsed.value) == 42 and all(item.account.data == b"" for item in parsed.value)
    assert {item["account"]["space"] for item in reply["result"]["value"]} == {96}
    bare = await rpc(client, "getProgramAccounts", world.program_id, {"encoding": "base64"})
    assert isinstance(bare["result"], list) and len(bare["result"]) == len(world.program_accounts(world.program_id)) > 42
    b64 = {"memcmp": {"offset": 8, "bytes": base64.b64encode(b"LOTTO").decode(), "encoding": "base64"}}
    assert len((await rpc(client, "getProgramAccounts", world.program_id, {"filters": [b64]}))["result"]) >= 42
    five = await rpc(client, "getProgramAccounts", world.program_id, {"filters": [{"dataSize": 96}] * 5})
    assert five["error"]["code"] == -32602
    odd = await rpc(client, "getProgramAccounts", world.program_id, {"filters": [{"what": 1}]})
    assert odd["error"]["code"] == -32602


async def test_token_account_balance(world: World, client: httpx.AsyncClient) -> None:
    ata = world.set_token_balance(WALLET, world.token_mint, 123)
    reply = await rpc(client, "getTokenAccountBalance", ata)
    assert reply["result"]["value"] == {"amount": "123", "decimals": 6, "uiAmount": 0.000123, "uiAmountString": "0.000123"}
    assert GetTokenAccountBalanceResp.from_json(json.dumps(reply)).value.amount == "123"
    world.set_token_balance(WALLET, world.token_mint, 2_500_000)
    assert (await rpc(client, "getTokenAccountBalance", ata))["result"]["value"]["uiAmountString"] == "2.5"
    not_token = await rpc(client, "getTokenAccountBalance", world.pot_account)
    assert not_token["error"]["code"] == -32602
    missing = await rpc(client, "getTokenAccountBalance", str(Pubkey.new_unique()))
    assert missing["error"]["code"] == -32602


async def test_protocol_errors(world: World, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        garbage = (await client.post("/", content=b"{nope")).json()
        empty = (await client.post("/", json=[])).json()
        no_version = (await client.post("/", json={"id": 3, "method": "getSlot"})).json()
    assert garbage == {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}
    assert empty["error"]["code"] == -32600 and isinstance(empty, dict)
    assert no_version["error"]["code"] == -32600 and no_version["id"] == 3
    assert (await rpc(client, "getBalance", "xyz"))["error"]["message"] == "Invalid param: Invalid"
    assert (await rpc(client, "getBalance", 5))["error"]["code"] == -32602
    assert (await rpc(client, "getBalance"))["error"]["code"] == -32602
    assert (await rpc(client, "getAccountInfo", WALLET, {"encoding": "utf-9"}))["error"]["code"] == -32602
    assert (await rpc(client, "getClusterNodes"))["error"]["code"] == -32601


# ---- fault knobs ----


async def test_rate_limit_answers_429(world: World, client: httpx.AsyncClient) -> None:
    world.set_faults(rate_limit_rps=3)
    with trio.fail_after(10):
        statuses = [(await client.post("/", json={"jsonrpc": "2.0", "id": 1, "method": "getSlot"})) for _ in range(5)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
    assert statuses[3].headers["retry-after"] == "1"
    assert statuses[3].json() == {
        "jsonrpc": "2.0",
        "error": {"code": 429, "message": "Too many requests for a specific RPC call"},
        "id": None,
    }
    counters = world.counters()
    assert (counters["http_429"], counters["rpc_requests"], counters["rpc_methods"]["getSlot"]) == (2, 5, 3)


async def test_rate_limit_counts_batch_items() -> None:
    now = [0.0]
    world = World(clock=lambda: now[0])
    world.set_faults(rate_limit_rps=10)
    assert world.admit_rpc(25)  # admitted while the bucket has a token, then in debt
    now[0] = 1.0
    assert not world.admit_rpc(1)  # 10 - 25 + 10 = -5
    now[0] = 1.6
    assert world.admit_rpc(1)


async def test_error_malformed_timeout_latency(world: World, client: httpx.AsyncClient) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "getSlot"}
    with trio.fail_after(10):
        world.set_faults(error_ratio=1)
        assert (await client.post("/", json=body)).status_code in (500, 503)
        assert (await client.get("/price/v3", params={"ids": world.token_mint})).status_code in (500, 503)
        world.set_faults(error_ratio=0, malformed_ratio=1)
        for _ in range(4):
            r = await client.post("/", json=body)
            assert r.status_code == 200
            try:
                assert "result" not in r.json()
            except json.JSONDecodeError:
                pass
        world.set_faults(malformed_ratio=0, timeout_ratio=1)
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/", json=body, timeout=0.2)
        world.set_faults(timeout_ratio=0, latency=0.1)
        t0 = trio.current_time()
        assert (await client.post("/", json=body)).status_code == 200
        assert trio.current_time() - t0 >= 0.1
    counters = world.counters()
    assert (counters["http_5xx"], counters["malformed"], counters["timeouts"]) == (2, 4, 1)


# ---- Jupiter Price API v3 ----


async def test_price_api(world: World, client: httpx.AsyncClient) -> None:
    unpriced = str(Pubkey.new_unique())
    with trio.fail_after(10):
        r = await client.get("/price/v3", params={"ids": f"{world.token_mint},{unpriced}"}, headers={"x-api-key": "k-123"})
        assert r.status_code == 200
        assert r.json() == {world.token_mint: {"usdPrice": 0.042, "blockId": world.slot, "decimals": 6, "priceChange24h": 0.0}}
        assert world.last_api_key == "k-123"
        world.set_price(world.token_mint, 0.084)
        r = await client.get("/price/v3", params={"ids": world.token_mint})
        assert r.json()[world.token_mint]["priceChange24h"] == 100.0
        many = ",".join(str(Pubkey.new_unique()) for _ in range(51))
        assert (await client.get("/price/v3", params={"ids": many})).status_code == 400
        assert (await client.get("/price/v3", params={"ids": "bad!"})).status_code == 400
        assert (await client.get("/price/v3")).status_code == 400
        world.set_faults(price_rate_limit_rps=1)
        statuses = [(await client.get("/price/v3", params={"ids": world.token_mint})).status_code for _ in range(2)]
        assert statuses == [200, 429]
    counters = world.counters()
    assert counters["price_requests"] == 7 and counters["price_ids"] == 2 + 1 + 51 + 1 + 0 + 1  # a 429 is not looked at
    assert counters["http_requests"] == 7 and counters["rpc_calls"] == 0


# ---- PubSub over WebSocket ----


@asynccontextmanager
async def open_ws(url: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect to the sim's PubSub, owning the TCP stream (trio-websocket 0.12 leaks it
    after a server-side close or a rejected handshake)."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, parts.hostname, "/")
            try:
                yield ws
            finally:
                await ws.aclose()
    finally:
        await stream.aclose()


async def _ws_json(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())


async def test_pubsub_account_and_slot(world: World, url: str) -> None:
    with trio.fail_after(10):
        async with open_ws(url) as ws:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "accountSubscribe", "params": [world.pot_account, {"encoding": "base64", "commitment": "confirmed"}]}))
            confirm = await _ws_json(ws)
            assert confirm["id"] == 1 and isinstance(confirm["result"], int)
            assert world.counters()["ws_subscriptions_active"] == 1
            world.set_jackpot(20_000_000_000)
            note = await ws.get_message()
            parsed = parse_notification(note)
            assert isinstance(parsed, AccountNotification)
            assert parsed.result.value.lamports == 20_000_000_000 and parsed.subscription == confirm["result"]
            assert parsed.result.context.slot == world.slot

            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "slotSubscribe"}))
            slot_sub = (await _ws_json(ws))["result"]
            world.advance_slot()
            slot_note = parse_notification(await ws.get_message())
            assert isinstance(slot_note, SlotNotification)
            assert slot_note.subscription == slot_sub and slot_note.result.slot == world.slot

            for req_id, method, sub in ((3, "accountUnsubscribe", confirm["result"]), (4, "slotUnsubscribe", slot_sub)):
                await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": [sub]}))
                assert await _ws_json(ws) == {"jsonrpc": "2.0", "result": True, "id": req_id}
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 5, "method": "accountUnsubscribe", "params": [999]}))
            assert (await _ws_json(ws))["error"]["code"] == -32602
            await ws.send_message("{broken")
            assert (await _ws_json(ws))["error"]["code"] == -32700
            assert world.counters()["ws_subscriptions_active"] == 0
        await trio.testing.wait_all_tasks_blocked()
    counters = world.counters()
    assert counters["ws_connections_total"] == 1 and counters["ws_subscriptions_total"] == 2
    assert counters["ws_notifications"] == 2


async def test_pubsub_drop_and_refuse(world: World, url: str) -> None:
    with trio.fail_after(10):
        async with open_ws(url) as ws:
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "slotSubscribe"}))
            await ws.get_message()
            assert world.drop_ws() == 1
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason.code == 1012
        world.set_faults(refuse_ws=True)
        with pytest.RaisesGroup(trio_websocket.ConnectionRejected, check=lambda g: g.exceptions[0].status_code == 503):
            async with open_ws(url):
                pass  # pragma: no cover
        await trio.testing.wait_all_tasks_blocked()
    assert world.counters()["ws_refused"] == 1 and world.counters()["ws_connections_active"] == 0


# ---- control API ----


async def test_control_api(world: World, client: httpx.AsyncClient) -> None:
    mint = str(Pubkey.new_unique())
    with trio.fail_after(10):
        await rpc(client, "getSlot")
        stats = (await client.get("/control/stats")).json()
        assert stats["counters"]["rpc_methods"] == {"getSlot": 1} and stats["faults"]["latency"] == 0.0
        assert (await client.post("/control/faults", json={"error_ratio": 0.25})).json()["faults"]["error_ratio"] == 0.25
        assert (await client.post("/control/faults", json={"bogus": 1})).status_code == 400
        assert (await client.post("/control/faults", content=b"[")).status_code == 400
        assert (await client.post("/control/reset", json={"faults": True})).status_code == 200
        assert world.counters()["rpc_calls"] == 0 and world.error_ratio == 0
        r = await client.post("/control/mint", json={"mint": mint, "decimals": 9, "tokenProgram": "token-2022", "price": 1.5})
        assert r.status_code == 200 and world.accounts[mint].owner == TOKEN_2022_PROGRAM and world.prices[mint] == 1.5
        assert (await client.post("/control/mint", json={"mint": mint, "tokenProgram": "x"})).status_code == 400
        assert (await client.post("/control/price", json={"mint": mint, "price": 2.0})).status_code == 200
        assert world.prices[mint] == 2.0
        assert (await client.post("/control/price", json={"mint": mint, "price": -1})).status_code == 400
        assert (await client.post("/control/jackpot", json={"lamports": 5})).json()["lamports"] == 5
        assert (await client.post("/control/jackpot", json={"delta": 10})).json()["lamports"] == 15
        assert (await client.post("/control/jackpot", json={"delta": "x"})).status_code == 400
        assert (await client.post("/control/participants", json={"add": 8})).json() == {"count": 50}
        assert (await client.post("/control/participants", json={"add": -1})).status_code == 400
        r = await client.post("/control/token-balance", json={"wallet": WALLET, "mint": mint, "amount": 7})
        assert r.status_code == 200 and world.token_balance(r.json()["tokenAccount"]) == (7, 9)
        assert (await client.post("/control/token-balance", json={"wallet": "x", "mint": mint, "amount": 7})).status_code == 400
        assert (await client.post("/control/token-balance", json={"wallet": WALLET, "mint": mint})).status_code == 400
        assert (await client.post("/control/drop-ws")).json() == {"dropped": 0}
    assert world.counters()["http_requests"] == 0  # the control API is not upstream traffic


async def test_busy_port_is_a_plain_oserror(url: str) -> None:
    with pytest.raises(OSError):
        await serve_simulator(make_world(), url.removeprefix("http://"))
