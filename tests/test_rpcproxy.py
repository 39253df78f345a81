"""POST /rpc's proxy (rpc/proxy.py, rpc/policy.py) against a fake provider (httpx.MockTransport)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from solders.pubkey import Pubkey
from solders.signature import Signature

from edgestate import config
from edgestate.cache import Cache
from edgestate.rpc import policy
from edgestate.rpc.proxy import RpcProxy
from edgestate.upstream.pool import Pool
from edgestate.upstream.ratelimit import RateLimiter

SECRET = "s3cr3t-KEY-987"
URL = f"https://rpc.example.com/?api-key={SECRET}"
PROGRAM = "Lotto1Program111111111111111111111111111111"


def key() -> str:
    return str(Pubkey.new_unique())


def sig() -> str:
    return str(Signature(os.urandom(64)))


class Provider:
    """Records every JSON-RPC item; answers by method; ``hook`` may replace the answer."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.posts = 0
        self.hook: Callable[[httpx.Request, Any], httpx.Response | None] | None = None
        self.hang = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.posts += 1
        items = body if isinstance(body, list) else [body]
        self.items.extend(items)
        if self.hang:
            await trio.sleep_forever()
        if self.hook is not None:
            scripted = self.hook(request, body)
            if scripted is not None:
                return scripted
        out = [self.answer(i) for i in items]
        return httpx.Response(200, json=out if isinstance(body, list) else out[0])

    def methods(self) -> list[str]:
        return [i["method"] for i in self.items]

    @staticmethod
    def answer(item: dict[str, Any]) -> dict[str, Any]:
        method, params, rid = item["method"], item.get("params") or [], item["id"]
        ctx = {"slot": 7}
        result: Any
        if method == "getMultipleAccounts":
            result = {"context": ctx, "value": [{"lamports": 5, "owner": PROGRAM, "data": ["", "base64"],
                                                  "executable": False, "rentEpoch": 0, "space": 0} for _ in params[0]]}
        elif method == "getAccountInfo":
            result = {"context": ctx, "value": {"lamports": 5, "owner": PROGRAM, "data": ["", "base64"],
                                                 "executable": False, "rentEpoch": 0, "space": 0}}
        elif method == "getBalance":
            result = {"context": ctx, "value": 5}
        elif method == "getSignatureStatuses":
            result = {"context": ctx, "value": [{"slot": 6, "confirmations": None, "err": None, "status": {"Ok": None},
                                                  "confirmationStatus": "finalized"} for _ in params[0]]}
        elif method == "getLatestBlockhash":
            result = {"context": ctx, "value": {"blockhash": "11111111111111111111111111111111",
                                                 "lastValidBlockHeight": 99}}
        elif method == "sendTransaction":
            result = "5" * 87
        else:
            result = 1
        return {"jsonrpc": "2.0", "id": rid, "result": result}


def make_cfg(**rpc: Any) -> config.Config:
    raw = {"upstream": {"rpc_url": [URL], "batch_window_ms": 10, "request_timeout": 5.0, "max_retries": 2},
           "rpc": {"per_client_rps": 0, **rpc}}
    return config.from_dict(raw, source="test", environ={})


class Harness:
    def __init__(self, proxy: RpcProxy, provider: Provider) -> None:
        self.proxy, self.provider = proxy, provider

    async def call(self, method: str, *params: Any, client: str = "1.2.3.4", req_id: Any = 1) -> dict[str, Any]:
        body = json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": list(params)}).encode()
        status, _headers, raw = await self.proxy.handle(body, client)
        assert status == 200
        return json.loads(raw)

    async def raw(self, body: Any, client: str = "1.2.3.4") -> tuple[int, dict[str, str], Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, headers, raw = await self.proxy.handle(data, client)
        return status, dict(headers), json.loads(raw) if raw else None


@pytest.fixture
async def make(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    async def build(**rpc: Any) -> Harness:
        cfg = make_cfg(**rpc)
        provider = Provider()
        transport = httpx.MockTransport(provider)
        limiter = RateLimiter(1000.0)
        pool = Pool(cfg.upstream, limiter, transport=transport)
        send_cfg = config.from_dict({"upstream": {"rpc_url": [URL], "max_retries": 0, "max_batch_size": 1,
                                                  "batch_window_ms": 0, "request_timeout": 5.0}},
                                    source="test", environ={}).upstream
        send_pool = Pool(send_cfg, limiter, transport=transport)
        proxy = RpcProxy(cfg, pool, Cache(cfg.cache), limiter, send_pool=send_pool)
        await nursery.start(pool.run)
        await nursery.start(proxy.run)
        return Harness(proxy, provider)

    yield build


async def test_method_outside_allowlist_is_32601_and_never_sent(make: Any) -> None:
    h = await make(allowed_methods=["getBalance"])
    answer = await h.call("getAccountInfo", key())
    assert answer == {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": 1}
    assert (await h.call("requestAirdrop", key(), 1))["error"]["code"] == -32601
    assert h.provider.items == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("getBalance", ["not-a-key"]),
        ("getBalance", []),
        ("getBalance", [key(), {"commitment": "max"}]),
        ("getAccountInfo", [key(), {"encoding": "utf-9"}]),
        ("getMultipleAccounts", [[key() for _ in range(101)]]),
        ("getSignatureStatuses", [["x" * 88]]),
        ("getSignatureStatuses", [[sig() for _ in range(257)]]),
        ("getProgramAccounts", [key()]),  # not an allowed program
        ("getProgramAccounts", [PROGRAM, {"filters": [{"dataSize": 1}] * 5}]),
        ("sendTransaction", ["!!!", {"encoding": "base64"}]),
        ("sendTransaction", ["A" * 2000, {"encoding": "base64"}]),
        ("getLatestBlockhash", [{}, 1]),
        ("getMinimumBalanceForRentExemption", [-1]),
    ],
)
async def test_bad_params_are_32602_before_anything_goes_upstream(make: Any, method: str, params: list[Any]) -> None:
    h = await make()
    answer = await h.call(method, *params)
    assert answer["error"]["code"] == -32602, answer
    assert h.provider.items == []


async def test_lottery_program_is_allowed_for_get_program_accounts(make: Any) -> None:
    h = await make()
    answer = await h.call("getProgramAccounts", PROGRAM, {"dataSlice": {"offset": 0, "length": 0}})
    assert answer["result"] == 1
    assert h.provider.methods() == ["getProgramAccounts"]


async def test_reads_are_cached_per_commitment_and_processed_never(make: Any, autojump_clock: Any) -> None:
    h = await make()
    account = key()
    for _ in range(3):
        assert (await h.call("getBalance", account))["result"]["value"] == 5
    assert h.provider.methods() == ["getBalance"]
    await h.call("getBalance", account, {"commitment": "finalized"})  # another commitment: another entry
    assert h.provider.methods() == ["getBalance"] * 2
    await h.call("getBalance", account, {"commitment": "processed"})
    await h.call("getBalance", account, {"commitment": "processed"})
    assert h.provider.methods() == ["getBalance"] * 4
    await trio.sleep(5.1)  # cache.ttl
    await h.call("getBalance", account)
    assert h.provider.methods() == ["getBalance"] * 5
    m = h.proxy.stats()["methods"]["getBalance"]
    assert m["cache_hits"] == 2 and m["calls"] == {"ok": 7}


async def test_blockhash_cached_about_a_slot(make: Any, autojump_clock: Any) -> None:
    h = await make()
    await h.call("getLatestBlockhash")
    await h.call("getLatestBlockhash")
    assert h.provider.methods() == ["getLatestBlockhash"]
    await trio.sleep(policy.SLOT_TTL + 0.01)
    await h.call("getLatestBlockhash")
    assert h.provider.methods() == ["getLatestBlockhash"] * 2


async def test_send_and_simulate_are_never_cached(make: Any) -> None:
    h = await make()
    tx = "AQ" + "A" * 198  # valid base64, bounded; the fake provider does not parse it
    for _ in range(2):
        answer = await h.call("sendTransaction", tx, {"encoding": "base64"})
        assert answer["result"] == "5" * 87, answer
        await h.call("simulateTransaction", tx, {"encoding": "base64"})
    assert sorted(h.provider.methods()) == ["sendTransaction"] * 2 + ["simulateTransaction"] * 2


async def test_identical_calls_coalesce_and_single_reads_merge(make: Any) -> None:
    h = await make()
    account = key()
    others = [key() for _ in range(3)]
    results: list[Any] = []

    async def one(method: str, *params: Any) -> None:
        results.append(await h.call(method, *params))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one, "getAccountInfo", account, {"encoding": "base64"})
        for other in others:
            nursery.start_soon(one, "getAccountInfo", other, {"encoding": "base64"})
            nursery.start_soon(one, "getBalance", other)
    assert len(results) == 56 and all("result" in r for r in results)
    # 50 identical calls: one flight; 4 accounts read alike: one getMultipleAccounts item;
    # the 3 balances another (lamports only, no data).
    assert h.provider.methods() == ["getMultipleAccounts"] * 2
    assert sorted(len(i["params"][0]) for i in h.provider.items) == [3, 4]
    assert h.provider.posts == 1
    m = h.proxy.stats()["methods"]["getAccountInfo"]
    assert m["cache_misses"] == 4 and m["coalesced"] == 49


async def test_signature_statuses_of_many_clients_merge_into_calls_of_256(make: Any) -> None:
    h = await make()
    sigs = [sig() for _ in range(600)]
    answers: dict[int, Any] = {}

    async def client(i: int) -> None:
        answers[i] = await h.call("getSignatureStatuses", sigs[2 * i : 2 * i + 2], client=f"10.0.0.{i % 250}")

    async with trio.open_nursery() as nursery:
        for i in range(300):
            nursery.start_soon(client, i)
    calls = [i for i in h.provider.items if i["method"] == "getSignatureStatuses"]
    assert [len(c["params"][0]) for c in calls] == [256, 256, 88]
    assert all(len(a["result"]["value"]) == 2 and a["result"]["value"][0]["confirmationStatus"] == "finalized"
               for a in answers.values())
    # Finalized statuses are immutable: asking again costs nothing upstream.
    await h.call("getSignatureStatuses", sigs[:10])
    assert len([i for i in h.provider.items if i["method"] == "getSignatureStatuses"]) == 3


async def test_polling_wallets_cost_one_status_call_per_256_signatures_per_round(
        make: Any, autojump_clock: Any) -> None:
    """1,000 wallets poll their own signature once a second, each at its own phase.

    The round's polls spread over the whole second, so a merge window as short as the
    pool's batch window (10 ms here) would send ~100 calls per round; a slot-long window
    that closes at 256 signatures sends ceil(1000/256) = 4, and no poll waits more than
    about a slot.
    """
    import random

    h = await make()
    rng = random.Random(12)
    wallets, rounds = 1000, 3

    def not_landed_yet(request: httpx.Request, body: Any) -> httpx.Response | None:
        items = body if isinstance(body, list) else [body]
        out = [{"jsonrpc": "2.0", "id": i["id"], "result": {"context": {"slot": 7}, "value": [None] * len(i["params"][0])}}
               if i["method"] == "getSignatureStatuses" else Provider.answer(i) for i in items]
        return httpx.Response(200, json=out if isinstance(body, list) else out[0])

    h.provider.hook = not_landed_yet
    sigs = [sig() for _ in range(wallets)]
    waits: list[float] = []
    t0 = trio.current_time()

    async def wallet(s: str, phase: float) -> None:
        for k in range(rounds):
            await trio.sleep_until(t0 + phase + k)
            asked = trio.current_time()
            answer = await h.call("getSignatureStatuses", [s], client="10.0.0.1")
            assert answer["result"]["value"] == [None]
            waits.append(trio.current_time() - asked)

    async with trio.open_nursery() as nursery:
        for s in sigs:
            nursery.start_soon(wallet, s, rng.random())
    calls = [i for i in h.provider.items if i["method"] == "getSignatureStatuses"]
    assert sum(len(c["params"][0]) for c in calls) == wallets * rounds
    assert len(calls) <= rounds * -(-wallets // 256)
    assert max(waits) <= 0.4 + 0.05  # about a slot (+ the pool's window and the provider's reply)
    assert h.proxy.statuses.stats()["upstream_calls"] == len(calls)


async def test_a_malformed_blockhash_is_32602_not_a_crash(make: Any) -> None:
    h = await make()
    for bad in ("", "x", "1" * 10):
        answer = await h.call("isBlockhashValid", bad)
        assert answer["error"] == {"code": -32602, "message": "Invalid param: Invalid"}
    assert h.provider.items == []


async def test_cache_hits_in_a_batch_are_answered_in_order_and_counted(make: Any) -> None:
    h = await make()
    wallets = [key() for _ in range(3)]
    batch = [{"jsonrpc": "2.0", "id": i, "method": "getBalance", "params": [w, {"commitment": "confirmed"}]}
             for i, w in enumerate(wallets)]
    _, _, first = await h.raw(batch)
    before = len(h.provider.items)
    mixed = [*batch, {"jsonrpc": "2.0", "id": "new", "method": "getBalance", "params": [key()]},
             {"jsonrpc": "2.0", "id": 9, "method": "nope"}, {"jsonrpc": "2.0", "method": "getSlot"}]
    _, _, again = await h.raw(mixed)
    assert again[:3] == first and again[3]["id"] == "new" and again[4]["error"]["code"] == -32601
    assert len(again) == 5  # the notification gets no answer
    assert len(h.provider.items) == before + 1  # only the new wallet went upstream
    m = h.proxy.stats()["methods"]["getBalance"]
    assert m["cache_hits"] == 3 and m["cache_misses"] == 4 and m["calls"]["ok"] == 7


def test_status_window_is_about_a_slot_and_bounded() -> None:
    assert config.from_dict({}, environ={}).rpc.status_window_ms == 400.0
    assert config.from_dict({"rpc": {"status_window_ms": 0}}, environ={}).rpc.status_window_ms == 0
    for bad, msg in ((2500, "at most 2000 ms"), (-1, ">= 0")):
        with pytest.raises(config.ConfigError, match=msg):
            config.from_dict({"rpc": {"status_window_ms": bad}}, environ={})


async def test_send_transaction_is_forwarded_exactly_once_on_failure(make: Any) -> None:
    h = await make()
    h.provider.hook = lambda request, body: httpx.Response(503, text="busy")
    answer = await h.call("sendTransaction", "AQAA", {"encoding": "base64"})
    assert answer["error"]["code"] == -32603
    assert h.provider.methods() == ["sendTransaction"]  # no retry that could double-send
    assert SECRET not in json.dumps(answer) and "rpc.example.com" not in json.dumps(answer)


async def test_provider_errors_pass_through_with_data(make: Any) -> None:
    h = await make()
    data = {"err": "BlockhashNotFound", "logs": [], "accounts": None, "unitsConsumed": 0}

    def preflight(request: httpx.Request, body: Any) -> httpx.Response:
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "error": {
            "code": -32002, "message": "Transaction simulation failed: Blockhash not found", "data": data}})

    h.provider.hook = preflight
    answer = await h.call("sendTransaction", "AQAA", {"encoding": "base64"}, req_id="abc")
    assert answer == {"jsonrpc": "2.0", "id": "abc", "error": {
        "code": -32002, "message": "Transaction simulation failed: Blockhash not found", "data": data}}


async def test_upstream_failure_never_shows_the_provider_url(make: Any) -> None:
    h = await make()
    h.provider.hook = lambda request, body: httpx.Response(500, text=f"oops at {URL}")
    answer = await h.call("getBalance", key())
    assert answer["error"]["code"] == -32603
    assert SECRET not in json.dumps(answer) and "example.com" not in json.dumps(answer)


async def test_a_hanging_upstream_answers_within_request_timeout(make: Any, autojump_clock: Any) -> None:
    h = await make()
    h.provider.hang = True
    t0 = trio.current_time()
    status, _, body = await h.raw([{"jsonrpc": "2.0", "id": i, "method": "getSlot"} for i in range(3)]
                                  + [{"jsonrpc": "2.0", "id": 9, "method": "getSignatureStatuses", "params": [[sig()]]}])
    assert status == 200 and trio.current_time() - t0 <= 5.0 + 1e-6
    assert [a["error"]["code"] for a in body] == [-32603] * 4


async def test_batch_rules(make: Any) -> None:
    h = await make(max_batch=3)
    status, _, body = await h.raw([
        {"jsonrpc": "2.0", "id": 1, "method": "getSlot"},
        {"jsonrpc": "2.0", "id": 2, "method": "nope"},
        {"jsonrpc": "2.0", "method": "getSlot"},  # a notification: no answer
    ])
    assert status == 200 and [(a["id"], "result" in a) for a in body] == [(1, True), (2, False)]
    status, _, body = await h.raw([{"jsonrpc": "2.0", "id": i, "method": "getSlot"} for i in range(4)])
    assert status == 413 and body["error"]["code"] == -32600
    assert (await h.raw([]))[2]["error"]["code"] == -32600
    assert (await h.raw(b"{nope"))[2] == {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}
    assert (await h.raw(b"[" * 5000))[2]["error"]["code"] == -32700
    assert (await h.raw({"jsonrpc": "1.0", "id": 3, "method": "getSlot"}))[2]["error"]["code"] == -32600


async def test_per_client_budget_answers_429_per_call(make: Any, autojump_clock: Any) -> None:
    h = await make(per_client_rps=2)  # burst 4
    batch = [{"jsonrpc": "2.0", "id": i, "method": "getSlot"} for i in range(3)]
    assert (await h.raw(batch))[0] == 200
    status, headers, body = await h.raw(batch)  # 1 token left, 3 asked
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["code"] == 429
    assert (await h.raw(batch, client="5.6.7.8"))[0] == 200  # another client has its own budget
    await trio.sleep(1.0)
    assert (await h.raw(batch))[0] == 200


async def test_send_transaction_has_its_own_per_client_limit(make: Any, autojump_clock: Any) -> None:
    h = await make(send_per_client_rps=1)  # burst 2
    codes = [("error" in await h.call("sendTransaction", "AQAA", {"encoding": "base64"})) for _ in range(3)]
    assert codes == [False, False, True]
    assert h.provider.methods() == ["sendTransaction"] * 2


async def test_a_notification_invalidates_cached_reads_of_that_account(make: Any) -> None:
    h = await make()
    account = key()
    await h.call("getAccountInfo", account, {"encoding": "base64"})
    await h.call("getAccountInfo", account, {"encoding": "base64"})
    assert len(h.provider.items) == 1
    h.proxy.account_changed(account)
    await h.call("getAccountInfo", account, {"encoding": "base64"})
    assert len(h.provider.items) == 2


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(sorted(policy.RULES)), params=_json_values)
def test_validation_either_canonicalizes_or_says_32602(method: str, params: Any) -> None:
    pol = policy.Policy(policy.RULES, [PROGRAM], 5.0)
    try:
        name, canonical = pol.check(method, params)
    except policy.InvalidParams as exc:
        assert str(exc)
        return
    # Canonical params validate to themselves: the cache key is stable.
    assert pol.check(name, canonical)[1] == canonical
    json.dumps(canonical)


def test_canonical_params_share_one_cache_key() -> None:
    pol = policy.Policy(policy.RULES, [PROGRAM], 5.0)
    account = key()
    a = pol.check("getAccountInfo", [account, {"encoding": "base64", "commitment": "confirmed", "junk": 1}])[1]
    b = pol.check("getAccountInfo", [account, {"commitment": "confirmed", "encoding": "base64", "dataSlice": None}])[1]
    assert a == b
    assert pol.ttl("getAccountInfo", a) == 5.0
    assert pol.ttl("getAccountInfo", [account, {"commitment": "processed"}]) == 0
    assert pol.ttl("getGenesisHash", []) == policy.IMMUTABLE_TTL
    assert pol.ttl("sendTransaction", ["x"]) == 0


def test_rpc_config_keys_are_checked() -> None:
    with pytest.raises(config.ConfigError, match="rpc.allowed_methods: the proxy cannot serve 'requestAirdrop'"):
        config.from_dict({"rpc": {"allowed_methods": ["getSlot", "requestAirdrop"]}}, source="t", environ={})
    with pytest.raises(config.ConfigError, match=r"rpc.allowed_programs\[0\]: not a valid Solana public key"):
        config.from_dict({"rpc": {"allowed_programs": ["nope"]}}, source="t", environ={})
    with pytest.raises(config.ConfigError, match="rpc.max_batch: must be > 0"):
        config.from_dict({"rpc": {"max_batch": 0}}, source="t", environ={})
    cfg = config.from_dict({}, source="t", environ={"EDGESTATE_RPC_PER_CLIENT_RPS": "0"})
    assert cfg.rpc.per_client_rps == 0 and "sendTransaction" in cfg.rpc.allowed_methods
