"""GET /rpc PubSub multiplexing (rpc/mux.py, rpc/session.py) and POST /rpc through the server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio
from solders.keypair import Keypair
from solders.message import Message
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction

from edgestate import wsframes
from edgestate.rpc.mux import Registry
from edgestate.sim import txs
from edgestate.sim.world import LAMPORTS_PER_SOL, SYSTEM_PROGRAM
from tests.conftest import make_config, start_server, wait_for
from tests.wsclient import WsClient, masked

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


class FakeConn:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f[2:] if f[1] < 126 else f[4:]) for f in self.frames]


def test_registry_shares_one_upstream_subscription_and_one_frame() -> None:
    reg = Registry()
    reg.up()
    a, b = FakeConn(), FakeConn()
    params = ["Pot", {"commitment": "confirmed", "encoding": "base64"}]
    sub = reg.subscribe(a, "accountSubscribe", params, 1)
    assert reg.subscribe(b, "accountSubscribe", list(params), "x") is sub
    requests = reg.next_requests()
    assert [r["method"] for r in requests] == ["accountSubscribe"]
    assert a.frames == b.frames == []  # replies wait for the upstream confirmation
    reg.on_reply({"jsonrpc": "2.0", "id": requests[0]["id"], "result": 777})
    assert a.messages() == [{"jsonrpc": "2.0", "result": sub.id, "id": 1}]
    assert b.messages() == [{"jsonrpc": "2.0", "result": sub.id, "id": "x"}]
    reg.on_notification({"jsonrpc": "2.0", "method": "accountNotification",
                         "params": {"result": {"context": {"slot": 5}, "value": None}, "subscription": 777}})
    assert a.frames[-1] is b.frames[-1]  # encoded once, the same bytes for everyone
    assert a.messages()[-1]["params"]["subscription"] == sub.id
    assert reg.unsubscribe(a, sub.id, "accountSubscribe") and reg.next_requests() == []
    assert not reg.unsubscribe(a, sub.id, "accountSubscribe")
    assert reg.unsubscribe(b, sub.id, "accountSubscribe")
    assert [(r["method"], r["params"]) for r in reg.next_requests()] == [("accountUnsubscribe", [777])]
    assert reg.stats()["client_subscriptions"] == 0


def test_registry_reconnect_resubscribes_and_keeps_ids() -> None:
    reg = Registry()
    reg.up()
    a = FakeConn()
    sub = reg.subscribe(a, "slotSubscribe", [], 1)
    reg.on_reply({"id": reg.next_requests()[0]["id"], "result": 3})
    reg.lost()
    reg.up()
    (again,) = reg.next_requests()
    assert again["method"] == "slotSubscribe"
    assert reg.on_reply({"id": again["id"], "result": 9}) is sub  # to be re-read once
    reg.on_notification({"method": "slotNotification", "params": {"result": {"slot": 1}, "subscription": 9}})
    assert a.messages()[-1]["params"]["subscription"] == sub.id
    # A notification for the old upstream id is not routed any more.
    assert reg.on_notification({"method": "slotNotification", "params": {"result": {}, "subscription": 3}}) is None


def test_registry_refused_upstream_subscription_answers_the_waiting_clients() -> None:
    reg = Registry()
    reg.up()
    a = FakeConn()
    reg.subscribe(a, "programSubscribe", ["P", {"commitment": "finalized"}], 4)
    (request,) = reg.next_requests()
    reg.on_reply({"id": request["id"], "error": {"code": -32602, "message": "nope"}})
    assert a.messages() == [{"jsonrpc": "2.0", "error": {"code": -32602, "message": "nope"}, "id": 4}]
    assert reg.stats()["shared_subscriptions"] == 0 and reg.stats()["client_subscriptions"] == 0


async def rpc_server(nursery: trio.Nursery, sim: Any, **sections: Any) -> Any:
    sections.setdefault("state", FAR)
    server = await start_server(nursery, make_config(sim.url, **sections))
    await wait_for(lambda: server.services.refresher.pubsub.up)
    return server


async def ws(url: str, **kwargs: Any) -> WsClient:
    client = await WsClient.connect(url, path="/rpc", **kwargs)
    assert client.status == 101
    return client


async def test_many_clients_one_upstream_subscription_identical_bytes(nursery: trio.Nursery, sim: Any) -> None:
    with trio.fail_after(20):
        server = await rpc_server(nursery, sim)
        pot = sim.world.pot_account
        clients = [await ws(server.url) for _ in range(50)]
        for i, client in enumerate(clients):
            await client.send_json({"jsonrpc": "2.0", "id": i, "method": "accountSubscribe",
                                    "params": [pot, {"encoding": "base64", "commitment": "confirmed"}]})
        replies = [await c.message() for c in clients]
        assert {r["result"] for r in replies} == {replies[0]["result"]} and [r["id"] for r in replies] == list(range(50))
        stats = server.services.rpc_proxy.stats()["pubsub"]
        assert stats["upstream_subscriptions"] == 1 and stats["client_subscriptions"] == 50
        # The refresher's own two (the pot's accountSubscribe, the participants' programSubscribe) + ours.
        assert sim.world.counters()["ws_subscriptions_active"] == 3
        sim.world.set_jackpot(33 * LAMPORTS_PER_SOL)
        payloads = {(await c.frame())[1] for c in clients}
        assert len(payloads) == 1  # the same bytes for everyone
        note = json.loads(payloads.pop())
        assert note["method"] == "accountNotification" and note["params"]["result"]["value"]["lamports"] == 33e9
        for client in clients:
            await client.aclose()
        await wait_for(lambda: server.services.rpc_proxy.stats()["pubsub"]["upstream_subscriptions"] == 0)
        await wait_for(lambda: sim.world.counters()["ws_subscriptions_active"] == 2)  # unsubscribed upstream
        await server.shutdown()


async def test_upstream_reconnect_resubscribes_and_rereads_once(nursery: trio.Nursery, sim: Any) -> None:
    with trio.fail_after(20):
        server = await rpc_server(nursery, sim)
        client = await ws(server.url)
        await client.send_json({"jsonrpc": "2.0", "id": 1, "method": "accountSubscribe",
                                "params": [sim.world.pot_account, {"encoding": "base64"}]})
        sub_id = (await client.message())["result"]
        mux = server.services.rpc_proxy.mux
        await wait_for(lambda: mux.registry.by_upstream)
        sim.world.drop_ws()
        await wait_for(lambda: mux.connects >= 2 and mux.registry.by_upstream, timeout=10)
        reread = await client.message()  # one fresh value for what may have changed in the gap
        assert reread["params"]["subscription"] == sub_id and mux.rereads == 1
        sim.world.set_jackpot(44 * LAMPORTS_PER_SOL)
        note = await client.message()
        assert note["params"]["subscription"] == sub_id and note["params"]["result"]["value"]["lamports"] == 44e9
        await client.aclose()
        await server.shutdown()


async def test_signature_subscribe_through_the_mux(nursery: trio.Nursery, sim: Any) -> None:
    with trio.fail_after(20):
        server = await rpc_server(nursery, sim)
        payer = Keypair()
        sim.world.set_account(str(payer.pubkey()), LAMPORTS_PER_SOL, SYSTEM_PROGRAM)
        blockhash = txs.blockhash_at(sim.world.slot)
        from solders.hash import Hash

        ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=Keypair().pubkey(), lamports=1000))
        tx = Transaction([payer], Message.new_with_blockhash([ix], payer.pubkey(), Hash.from_string(blockhash)),
                         Hash.from_string(blockhash))
        signature = str(tx.signatures[0])
        clients = [await ws(server.url) for _ in range(3)]
        for client in clients:
            await client.send_json({"jsonrpc": "2.0", "id": 5, "method": "signatureSubscribe",
                                    "params": [signature, {"commitment": "confirmed"}]})
            assert isinstance((await client.message())["result"], int)
        import base64

        async with httpx.AsyncClient() as http:
            resp = await http.post(server.url + "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
                                                              "params": [base64.b64encode(bytes(tx)).decode(),
                                                                         {"encoding": "base64"}]})
        assert resp.json()["result"] == signature
        notes = [await c.message() for c in clients]
        assert all(n["method"] == "signatureNotification" and n["params"]["result"]["value"] == {"err": None}
                   for n in notes)
        await wait_for(lambda: server.services.rpc_proxy.stats()["pubsub"]["shared_subscriptions"] == 0)
        for client in clients:
            await client.aclose()
        await server.shutdown()


async def test_pubsub_limits_and_errors(nursery: trio.Nursery, sim: Any) -> None:
    with trio.fail_after(20):
        server = await rpc_server(nursery, sim, rpc={"max_subscriptions": 2})
        client = await ws(server.url)

        async def ask(method: str, params: Any, req_id: int = 1) -> dict[str, Any]:
            await client.send_json({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params})
            return await client.message()

        assert (await ask("getBalance", [sim.world.pot_account]))["error"]["code"] == -32601
        assert (await ask("accountSubscribe", ["nope"]))["error"]["code"] == -32602
        other = str(Keypair().pubkey())
        assert (await ask("programSubscribe", [other]))["error"]["code"] == -32602  # not an allowed program
        slot_sub = (await ask("slotSubscribe", []))["result"]
        assert isinstance((await ask("programSubscribe", [sim.world.program_id, {"encoding": "base64"}]))["result"], int)
        assert (await ask("accountSubscribe", [other]))["error"]["code"] == -32000  # over rpc.max_subscriptions
        # Skip slot notifications that may arrive in between.
        await client.send_json({"jsonrpc": "2.0", "id": 9, "method": "slotUnsubscribe", "params": [slot_sub]})
        while (reply := await client.message()).get("id") != 9:
            pass
        assert reply["result"] is True
        await client.send_json({"jsonrpc": "2.0", "id": 10, "method": "slotUnsubscribe", "params": [slot_sub]})
        while (reply := await client.message()).get("id") != 10:
            pass
        assert reply["error"]["message"] == "Invalid subscription id."
        await client.send_json({"jsonrpc": "2.0", "method": "ping"})  # web3.js keepalive: no answer
        await client.send_raw(masked(wsframes.OP_CLOSE, b"\x03\xe8"))
        assert await client.close_code() == 1000
        await client.aclose()
        await server.shutdown()


async def test_origin_allowlist_applies_to_rpc(nursery: trio.Nursery, sim: Any) -> None:
    with trio.fail_after(20):
        server = await rpc_server(nursery, sim, server={"allowed_origins": ["https://app.example"]})
        refused = await WsClient.connect(server.url, path="/rpc", origin="https://evil.example")
        assert refused.status == 403
        await refused.aclose()
        ok = await ws(server.url, origin="https://app.example")
        await ok.aclose()
        body = {"jsonrpc": "2.0", "id": 1, "method": "getSlot"}
        async with httpx.AsyncClient() as http:
            bad = await http.post(server.url + "/rpc", json=body, headers={"origin": "https://evil.example"})
            good = await http.post(server.url + "/rpc", json=body, headers={"origin": "https://app.example"})
            too_big = await http.post(server.url + "/rpc", content=b" " * 70_000)
            get = await http.get(server.url + "/rpc")
            stats = (await http.get(server.url + "/stats")).json()
        assert bad.status_code == 403 and bad.json()["error"]["code"] == -32600
        assert good.status_code == 200 and good.json()["result"] == sim.world.slot or good.json()["result"] > 0
        assert good.headers["access-control-allow-origin"] == "https://app.example"
        assert too_big.status_code == 413 and get.status_code == 405
        assert stats["rpc"]["methods"]["getSlot"]["calls"] == {"ok": 1}
        assert "upstream_subscriptions" in stats["rpc"]["pubsub"]
        await server.shutdown()
