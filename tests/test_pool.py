"""Pool: batching, merging, retries, failover, limits — against an httpx.MockTransport provider."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from edgestate.config import UpstreamConfig
from edgestate.errors import Overloaded, RpcError, UpstreamError, UpstreamTimeout
from edgestate.upstream.pool import Pool
from edgestate.upstream.ratelimit import Priority, RateLimiter

SECRET = "s3cr3t-KEY-123"
URL = f"https://rpc.example.com/?api-key={SECRET}"
URL2 = f"https://backup.example.com/?api-key={SECRET}"


def _keys(n: int) -> list[str]:
    from solders.pubkey import Pubkey

    return [str(Pubkey.new_unique()) for _ in range(n)]


class Provider:
    """A fake Solana RPC: records each request body, answers by method, scriptable."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.script: list[Callable[[httpx.Request, Any], httpx.Response | None]] = []
        self.accounts: dict[str, dict[str, Any]] = {}
        self.down: set[str] = set()  # hosts that answer 503

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((str(request.url), body))
        if request.url.host in self.down:
            return httpx.Response(503, text="down")
        if self.script:
            scripted = self.script.pop(0)(request, body)
            if scripted is not None:
                return scripted
        out = [self.answer(i) for i in body] if isinstance(body, list) else self.answer(body)
        return httpx.Response(200, json=out)

    def answer(self, item: dict[str, Any]) -> dict[str, Any]:
        method, params, rid = item["method"], item.get("params"), item["id"]
        ctx = {"slot": 42}
        if method == "bad":
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": "Invalid params"}}
        if method == "getHealth":
            return {"jsonrpc": "2.0", "id": rid, "result": "ok"}
        if method == "getAccountInfo":
            result: Any = {"context": ctx, "value": self.accounts.get(params[0])}
        elif method == "getBalance":
            acct = self.accounts.get(params[0])
            result = {"context": ctx, "value": acct["lamports"] if acct else 0}
        elif method == "getMultipleAccounts":
            result = {"context": ctx, "value": [self.accounts.get(k) for k in params[0]]}
        else:
            result = {"echo": [method, params]}
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    def items(self) -> list[dict[str, Any]]:
        return [i for _, b in self.requests for i in (b if isinstance(b, list) else [b])]

    def methods(self) -> list[str]:
        return [i["method"] for i in self.items()]


def account(lamports: int) -> dict[str, Any]:
    return {
        "lamports": lamports,
        "owner": "11111111111111111111111111111111",
        "data": ["", "base64"],
        "executable": False,
        "rentEpoch": 0,
        "space": 0,
    }


def make_cfg(**kw: Any) -> UpstreamConfig:
    base: dict[str, Any] = {
        "rpc_url": (URL,),
        "max_connections": 4,
        "request_timeout": 30.0,
        "max_retries": 3,
        "max_requests_per_second": 1_000_000.0,
    }
    base.update(kw)
    return UpstreamConfig(**base)


@pytest.fixture
def provider() -> Provider:
    return Provider()


async def start(nursery: trio.Nursery, provider: Provider, *, rate: float = 1e6, **kw: Any) -> Pool:
    cfg = make_cfg(**kw)
    pool = Pool(cfg, RateLimiter(rate, name="rpc"), transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    return pool


async def gather(*fns: Callable[[], Any]) -> list[Any]:
    """Run the thunks concurrently; each slot gets its result or exception."""
    out: list[Any] = [None] * len(fns)

    async def one(i: int) -> None:
        try:
            out[i] = await fns[i]()
        except Exception as exc:
            out[i] = exc

    async with trio.open_nursery() as n:
        for i in range(len(fns)):
            n.start_soon(one, i)
    return out


@pytest.fixture
async def pool(nursery: trio.Nursery, provider: Provider) -> AsyncIterator[Pool]:
    yield await start(nursery, provider)


# ---- batching ---------------------------------------------------------------------------


async def test_window_batches_calls_and_routes_each_result(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    t0 = trio.current_time()
    res = await gather(*[lambda i=i: pool.execute("getSlot", [{"n": i}]) for i in range(10)])
    assert [r["echo"][1][0]["n"] for r in res] == list(range(10))  # each caller its own result
    assert len(provider.requests) == 1 and len(provider.requests[0][1]) == 10
    assert trio.current_time() - t0 == pytest.approx(0.1)  # one window, from the first call


async def test_calls_after_the_window_go_in_a_second_request(
    autojump_clock: Any, pool: Pool, provider: Provider
) -> None:
    async def late() -> Any:
        await trio.sleep(0.15)
        return await pool.execute("getSlot", [2])

    await gather(lambda: pool.execute("getSlot", [1]), late)
    assert len(provider.requests) == 2
    assert all(not isinstance(b, list) for _, b in provider.requests)  # one item each: no array


async def test_identical_calls_in_a_window_are_asked_once(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    res = await gather(*[lambda: pool.execute("getSlot", []) for _ in range(50)])
    assert len({json.dumps(r) for r in res}) == 1
    assert provider.methods() == ["getSlot"]


async def test_max_batch_size_one_sends_no_arrays(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    pool = await start(nursery, provider, max_batch_size=1)
    res = await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(5)])
    assert [r["echo"][1][0] for r in res] == list(range(5))
    assert len(provider.requests) == 5 and all(isinstance(b, dict) for _, b in provider.requests)


async def test_one_invalid_item_fails_only_its_caller(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    res = await gather(
        lambda: pool.execute("getSlot", [1]), lambda: pool.execute("bad", [2]), lambda: pool.execute("getSlot", [3])
    )
    assert res[0]["echo"] == ["getSlot", [1]] and res[2]["echo"] == ["getSlot", [3]]
    assert isinstance(res[1], RpcError) and res[1].code == -32602 and not res[1].retryable
    assert len(provider.requests) == 1  # not retried


async def test_reply_items_routed_by_id_not_position(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    def reversed_and_missing(request: httpx.Request, body: Any) -> httpx.Response:
        out = [provider.answer(i) for i in body if i["params"] != [0]][::-1]
        return httpx.Response(200, json=out)  # reversed, and no reply for call 0

    provider.script.append(reversed_and_missing)
    res = await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(3)])
    assert isinstance(res[0], UpstreamError) and "no reply item" in str(res[0])
    assert [r["echo"][1][0] for r in res[1:]] == [1, 2]


# ---- merging ----------------------------------------------------------------------------


async def test_200_account_reads_become_two_get_multiple_accounts(
    autojump_clock: Any, pool: Pool, provider: Provider
) -> None:
    keys = _keys(200)
    provider.accounts = {k: account(i) for i, k in enumerate(keys) if i % 2 == 0}
    cfg = {"commitment": "confirmed", "encoding": "base64"}
    res = await gather(*[lambda k=k: pool.execute("getAccountInfo", [k, cfg]) for k in keys])
    assert provider.methods() == ["getMultipleAccounts", "getMultipleAccounts"]
    assert len(provider.requests) == 1
    for i, r in enumerate(res):
        assert r["context"] == {"slot": 42}
        assert r["value"] == (account(i) if i % 2 == 0 else None)
    assert all(it["params"][1] == cfg and len(it["params"][0]) == 100 for it in provider.items())
    assert pool.stats()["merged"] == 200


async def test_get_balance_merged_without_data(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    keys = _keys(3)
    provider.accounts = {keys[0]: account(5), keys[1]: account(7)}
    c = {"commitment": "confirmed"}
    res = await gather(*[lambda k=k: pool.execute("getBalance", [k, c]) for k in keys + [keys[0]]])
    assert [r["value"] for r in res] == [5, 7, 0, 5]  # 0 for a missing account, like Solana
    (item,) = provider.items()
    assert item["method"] == "getMultipleAccounts" and sorted(item["params"][0]) == sorted(keys)  # dupes once
    assert item["params"][1] == {
        "commitment": "confirmed",
        "encoding": "base64",
        "dataSlice": {"offset": 0, "length": 0},
    }


async def test_incompatible_configs_and_invalid_keys_not_merged(
    autojump_clock: Any, pool: Pool, provider: Provider
) -> None:
    a, b = _keys(2)
    res = await gather(
        lambda: pool.execute("getAccountInfo", [a, {"encoding": "base64"}]),
        lambda: pool.execute("getAccountInfo", [b, {"encoding": "jsonParsed"}]),
        lambda: pool.execute("getAccountInfo", ["not-a-key", {"encoding": "base64"}]),
    )
    assert sorted(provider.methods()) == ["getAccountInfo"] * 3
    assert all(r["value"] is None for r in res)


# ---- limits, timeouts -------------------------------------------------------------------


async def test_overloaded_past_max_queue(autojump_clock: Any, provider: Provider) -> None:
    pool = Pool(make_cfg(max_queue=3), RateLimiter(1e6), transport=httpx.MockTransport(provider))
    async with trio.open_nursery() as n:  # not started yet: nothing drains the queue
        for i in range(3):
            n.start_soon(pool.execute, "getSlot", [i])
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Overloaded) as info:
            await pool.execute("getSlot", [9])
        assert info.value.retry_after >= 1
        assert pool.stats()["overloaded"] == 1 and pool.stats()["queued"] == 3
        async with trio.open_nursery() as inner:
            await inner.start(pool.run)
            await trio.sleep(1)
            inner.cancel_scope.cancel()
    assert provider.methods() == ["getSlot"] * 3  # the queued ones were served


async def test_per_call_timeout_frees_the_caller(autojump_clock: Any, nursery: trio.Nursery) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1000)
        raise AssertionError  # pragma: no cover

    pool = Pool(make_cfg(request_timeout=2.0), RateLimiter(1e6), transport=httpx.MockTransport(hang))
    await nursery.start(pool.run)
    t0 = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        await pool.execute("getSlot")
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert pool.stats()["timeouts"] == 1


async def test_rate_limit_counts_batch_items(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    pool = await start(nursery, provider, rate=100)
    t0 = trio.current_time()
    await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(1000)])
    elapsed = trio.current_time() - t0
    assert len(provider.items()) == 1000
    assert 8.5 <= elapsed <= 10.5  # 1,000 items at 100/s with a 100-token burst


async def test_state_priority_not_behind_user(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    pool = await start(nursery, provider, rate=10, max_batch_size=10)
    done: dict[str, float] = {}

    async def user(i: int) -> None:
        await pool.execute("getSlot", [i])
        done[f"u{i}"] = trio.current_time()

    async def state() -> None:
        await trio.sleep(0.5)
        await pool.execute("getSlot", ["state"], priority=Priority.STATE)
        done["state"] = trio.current_time()

    async with trio.open_nursery() as n:
        for i in range(100):
            n.start_soon(user, i)
        n.start_soon(state)
    assert done["state"] < 3.0 < max(done.values())  # users take ~9 s at 10/s


# ---- retries ----------------------------------------------------------------------------


async def test_5xx_retried_with_backoff_then_error(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    provider.down.add("rpc.example.com")
    pool = await start(nursery, provider, max_retries=3)
    t0 = trio.current_time()
    with pytest.raises(UpstreamError) as info:
        await pool.execute("getSlot")
    assert len(provider.requests) == 4  # 1 + max_retries
    assert "HTTP 503" in str(info.value) and SECRET not in str(info.value)
    # window + full-jitter sleeps, each at most 0.1 * 2**attempt
    assert trio.current_time() - t0 <= 0.1 + 0.2 + 0.4 + 0.8 + 1e-9
    assert pool.stats()["retries"] == 3


async def test_retry_then_success(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    provider.script += [lambda r, b: httpx.Response(502), lambda r, b: httpx.Response(500)]
    assert (await pool.execute("getSlot"))["echo"] == ["getSlot", []]
    assert len(provider.requests) == 3


async def test_connection_error_retried_and_not_leaked(autojump_clock: Any, nursery: trio.Nursery) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}")

    pool = Pool(make_cfg(max_retries=2), RateLimiter(1e6), transport=httpx.MockTransport(refuse))
    await nursery.start(pool.run)
    with pytest.raises(UpstreamError) as info:
        await pool.execute("getSlot")
    assert "ConnectError" in str(info.value) and SECRET not in str(info.value)
    assert SECRET not in json.dumps(pool.stats())


async def test_429_honours_retry_after(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    provider.script.append(lambda r, b: httpx.Response(429, headers={"Retry-After": "3"}))
    limiter = RateLimiter(1e6)
    pool = Pool(make_cfg(), limiter, transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    t0 = trio.current_time()
    await pool.execute("getSlot")
    assert trio.current_time() - t0 >= 3.0
    assert limiter.stats()["penalties"] == 1 and len(provider.requests) == 2


async def test_jsonrpc_429_body_counts_as_429(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    body = {"jsonrpc": "2.0", "error": {"code": 429, "message": "Too many requests for a specific RPC call"}}
    provider.script.append(lambda r, b: httpx.Response(200, json=body))
    limiter = RateLimiter(1e6)
    pool = Pool(make_cfg(), limiter, transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    res = await gather(lambda: pool.execute("getSlot", [1]), lambda: pool.execute("getSlot", [2]))
    assert [r["echo"][1][0] for r in res] == [1, 2]
    assert limiter.stats()["penalties"] == 1 and len(provider.requests) == 2


async def test_malformed_bodies_fail_callers_and_pool_keeps_working(
    autojump_clock: Any, pool: Pool, provider: Provider
) -> None:
    provider.script += [
        lambda r, b: httpx.Response(200, text="<html>oops</html>"),
        lambda r, b: httpx.Response(200, json={"result": "not a list"}),
        lambda r, b: httpx.Response(200, json=[1, "x", None]),
        lambda r, b: httpx.Response(200, json=[{"id": i["id"]} for i in b]),
    ]
    for expected in ("not JSON", "not a list", "no reply item", "neither result nor error"):
        res = await gather(lambda: pool.execute("getSlot", [1]), lambda: pool.execute("getSlot", [2]))
        assert all(isinstance(r, UpstreamError) and expected in str(r) for r in res), (expected, res)
    assert (await pool.execute("getSlot"))["echo"] == ["getSlot", []]
    assert len(provider.requests) == 5  # malformed replies are not retried


async def test_cancelled_caller_does_not_block_workers(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    with trio.move_on_after(0.05):
        await pool.execute("getSlot", [1])
    await trio.sleep(1)
    assert len(provider.requests) == 0  # nobody waited any more: nothing sent
    assert (await pool.execute("getSlot", [2]))["echo"] == ["getSlot", [2]]


# ---- failover ---------------------------------------------------------------------------


async def test_failover_and_back_after_probe(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edgestate.upstream")
    caplog.set_level(logging.INFO, logger="httpx")  # httpx logs each request URL at INFO
    provider.down.add("rpc.example.com")
    pool = await start(nursery, provider, rpc_url=(URL, URL2))
    for i in range(3):
        assert (await pool.execute("getSlot", [i]))["echo"][1] == [i]  # retried on the backup
    ep = pool.stats()["endpoints"]
    assert ep[0]["healthy"] is False and ep[0]["last_error"] == "HTTP 503" and ep[1]["healthy"]
    before = len(provider.requests)
    await pool.execute("getSlot", [9])
    assert [u for u, _ in provider.requests[before:]] == [URL2]  # the down one is skipped
    provider.down.clear()
    await trio.sleep(5)  # the prober's getHealth sees "ok"
    assert pool.stats()["endpoints"][0]["healthy"] is True
    before = len(provider.requests)
    await pool.execute("getSlot", [10])
    assert [u for u, _ in provider.requests[before:]] == [URL]
    assert any(b.get("method") == "getHealth" for _, b in provider.requests if isinstance(b, dict))
    text = caplog.text + json.dumps(pool.stats()) + repr(pool)
    assert "marked down" in caplog.text and "back up" in caplog.text
    assert "HTTP Request: POST https://rpc.example.com/?api-key=***" in caplog.text
    assert SECRET not in text and "api-key=***" in json.dumps(pool.stats())


async def test_all_endpoints_down_still_tried(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    provider.down.update({"rpc.example.com", "backup.example.com"})
    pool = await start(nursery, provider, rpc_url=(URL, URL2), max_retries=5)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await pool.execute("getSlot")
    assert not any(e["healthy"] for e in pool.stats()["endpoints"])
    provider.down.discard("backup.example.com")
    n = len(provider.requests)
    assert (await pool.execute("getSlot"))["echo"] == ["getSlot", []]
    assert len(provider.requests) > n


async def test_stats_shape(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(4)])
    s = pool.stats()
    assert s["calls"] == 4 and s["http_requests"] == 1 and s["batches"] == 1 and s["avg_batch_size"] == 4
    assert s["calls_by_method"] == {"getSlot": 4} and s["connections"] == 4 and s["idle"] == 4
    assert s["latency_ms"]["p50"] is not None and s["credits_per_second"] > 0
    assert s["projected_monthly_credits"] > 0 and s["endpoints"][0]["url"].endswith("api-key=***")
    json.dumps(s)


async def test_credits_and_request_rate_are_separate_budgets(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    # Issue 11: the per-second bucket used to take 10 tokens for a getProgramAccounts
    # (its credits); providers count it as one request, and bill 10 credits a month.
    limiter = RateLimiter(1e6)
    pool = Pool(make_cfg(), limiter, transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    await gather(lambda: pool.execute("getProgramAccounts", ["x"]), lambda: pool.execute("getSlot"))
    assert limiter.stats()["granted_cost"] == 2  # two requests
    assert pool.credits.total() == 11  # ten credits + one
    stats = pool.stats()
    assert stats["credits"]["by_provider"][stats["endpoints"][0]["url"]]["total"] == 11
    assert stats["endpoints"][0]["credits_total"] == 11


async def test_get_program_accounts_has_its_own_per_second_limit(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    # Helius Free: 10 req/s overall, getProgramAccounts 5/s (the defaults).
    pool = Pool(make_cfg(max_requests_per_second=10.0), RateLimiter(10.0), transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    t0 = trio.current_time()
    await gather(*[lambda i=i: pool.execute("getProgramAccounts", [str(i)]) for i in range(15)])
    # 5 at once (the burst), then 5 a second: the last 5 leave after 2 s.
    assert trio.current_time() - t0 >= 2.0
    assert pool.stats()["method_rate_limiters"]["getProgramAccounts"]["granted_cost"] == 15


def test_defaults_fit_helius_free_but_the_contract_rate() -> None:
    cfg = UpstreamConfig()
    # 100/s is the contract's default (over Helius Free's 10/s: check-config says so).
    assert cfg.max_requests_per_second == 100 and cfg.method_rate_limits == {"getProgramAccounts": 5}
    assert cfg.credits_per_month == 1_000_000 and cfg.max_batch_bytes == 45 * 1024


# ---- size-aware batching, refusals ------------------------------------------------------


async def test_batches_stay_under_the_byte_limit(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    # 1,000 distinct balance reads: ten getMultipleAccounts of 100 keys are ~48 KB as one body.
    pool = await start(nursery, provider, max_batch_bytes=20_000)
    keys = _keys(1000)
    await gather(*[lambda k=k: pool.execute("getBalance", [k]) for k in keys])
    sizes = [len(json.dumps(b, separators=(",", ":"))) for _, b in provider.requests]
    assert len(sizes) >= 3 and max(sizes) <= 20_000
    assert sum(len(b) for _, b in provider.requests if isinstance(b, list)) == 10
    assert pool.stats()["largest_body_bytes"] <= 20_000


async def test_413_splits_the_batch_and_retries_the_halves(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    limit = 3000

    def too_big(request: httpx.Request, body: Any) -> httpx.Response | None:
        provider.script.append(too_big)  # keep judging every request
        return httpx.Response(413, text="Payload Too Large") if len(request.content) > limit else None

    provider.script.append(too_big)
    pool = await start(nursery, provider, max_batch_bytes=46080)
    got = await gather(*[lambda i=i: pool.execute("getSlot", [{"minContextSlot": i, "pad": "x" * 40}]) for i in range(80)])
    assert [g["echo"][1][0]["minContextSlot"] for g in got] == list(range(80))  # every call answered
    assert pool.stats()["split_413"] >= 2
    assert all(len(json.dumps(b)) for _, b in provider.requests)


async def test_a_single_call_over_the_limit_fails_alone(autojump_clock: Any, nursery: trio.Nursery, provider: Provider) -> None:
    provider.script.append(lambda request, body: httpx.Response(413))
    pool = await start(nursery, provider)
    with pytest.raises(UpstreamError, match="413"):
        await pool.execute("getSlot", [{"pad": "x" * 100}])


async def test_batch_refused_as_a_whole_is_retried_call_by_call(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(request: httpx.Request, body: Any) -> httpx.Response | None:
        provider.script.append(refuse)
        if isinstance(body, list):
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": None,
                                             "error": {"code": -32600, "message": "Batch requests are not supported"}})
        return None

    provider.script.append(refuse)
    pool = await start(nursery, provider)
    got = await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(5)])
    assert [g["echo"][1] for g in got] == [[i] for i in range(5)]
    stats = pool.stats()
    assert stats["batch_refusals"] == 1 and stats["endpoints"][0]["refuses_batches"] is True
    assert stats["batch_refusing_endpoints"] == [stats["endpoints"][0]["url"]]
    assert "one by one" in caplog.text
    # Remembered: the next window goes out call by call at once, no refused batch first.
    n = len(provider.requests)
    await gather(*[lambda i=i: pool.execute("getSlot", [10 + i]) for i in range(3)])
    assert [isinstance(b, list) for _, b in provider.requests[n:]] == [False] * 3
    assert pool.stats()["batch_refusals"] == 1


# ---- failover on blocked keys and lagging nodes -------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_failover_on_a_refused_key(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider, status: int
) -> None:
    def blocked(request: httpx.Request, body: Any) -> httpx.Response | None:
        provider.script.append(blocked)
        if request.url.host == "rpc.example.com":
            return httpx.Response(status, json={"jsonrpc": "2.0", "id": None, "error": {"code": status, "message": "no"}})
        return None

    provider.script.append(blocked)
    pool = await start(nursery, provider, rpc_url=(URL, URL2))
    assert (await pool.execute("getSlot", [1]))["echo"] == ["getSlot", [1]]
    ep = pool.stats()["endpoints"]
    assert ep[0]["healthy"] is False and f"HTTP {status}" in ep[0]["down_reason"]
    assert pool.stats()["failovers"] == {f"HTTP {status}": 1}
    n = len(provider.requests)
    await pool.execute("getSlot", [2])
    assert [u for u, _ in provider.requests[n:]] == [URL2]  # down at once, not after three tries


@pytest.mark.parametrize("whole", [True, False])
async def test_failover_when_the_node_is_behind(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider, whole: bool
) -> None:
    behind = {"code": -32005, "message": "Node is behind by 120 slots", "data": {"numSlotsBehind": 120}}

    def lagging(request: httpx.Request, body: Any) -> httpx.Response | None:
        provider.script.append(lagging)
        if request.url.host != "rpc.example.com":
            return None
        if whole:
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": None, "error": behind})
        items = body if isinstance(body, list) else [body]
        out = [{"jsonrpc": "2.0", "id": i["id"], "error": behind} for i in items]
        return httpx.Response(200, json=out if isinstance(body, list) else out[0])

    provider.script.append(lagging)
    pool = await start(nursery, provider, rpc_url=(URL, URL2))
    got = await gather(lambda: pool.execute("getSlot", [1]), lambda: pool.execute("getSlot", [2]))
    assert [g["echo"] for g in got] == [["getSlot", [1]], ["getSlot", [2]]]
    ep = pool.stats()["endpoints"][0]
    assert ep["healthy"] is False and "node behind" in ep["down_reason"] and "-32005" in ep["down_reason"]


async def test_node_behind_with_no_other_endpoint_is_an_error_after_retries(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    def lagging(request: httpx.Request, body: Any) -> httpx.Response:
        provider.script.append(lagging)
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"],
                                         "error": {"code": -32005, "message": "Node is unhealthy"}})

    provider.script.append(lagging)
    pool = await start(nursery, provider, max_retries=2)
    with pytest.raises(UpstreamError, match="-32005"):
        await pool.execute("getSlot")
    assert len(provider.requests) == 3


async def test_unserializable_params_fail_only_that_caller(autojump_clock: Any, pool: Pool, provider: Provider) -> None:
    res = await gather(lambda: pool.execute("getSlot", [object()]), lambda: pool.execute("getSlot", [1]))
    assert isinstance(res[0], TypeError) and res[1]["echo"] == ["getSlot", [1]]


async def test_stopped_pool_fails_queued_and_new_calls(autojump_clock: Any, provider: Provider) -> None:
    pool = Pool(make_cfg(), RateLimiter(1e6), transport=httpx.MockTransport(provider))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        n.cancel_scope.cancel()
    with pytest.raises(UpstreamError, match="not running"):
        await pool.execute("getSlot")


async def test_callers_gone_before_rate_limit_grant_spend_nothing(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    limiter = RateLimiter(1, burst=1)
    pool = Pool(make_cfg(request_timeout=2.0, max_batch_size=1), limiter, transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    res = await gather(*[lambda i=i: pool.execute("getSlot", [i]) for i in range(10)])
    assert sum(isinstance(r, UpstreamTimeout) for r in res) >= 7
    await trio.sleep(20)
    assert len(provider.requests) <= 3 and limiter.stats()["granted"] <= 3


async def test_stopping_the_pool_fails_waiting_callers_at_once(autojump_clock: Any) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(1000)
        raise AssertionError  # pragma: no cover

    pool = Pool(make_cfg(), RateLimiter(1e6), transport=httpx.MockTransport(hang))
    res: list[Any] = []

    async def call(i: int) -> None:
        try:
            await pool.execute("getSlot", [i])
        except UpstreamError as exc:
            res.append(exc)

    async with trio.open_nursery() as outer:
        for i in range(3):
            outer.start_soon(call, i)
        async with trio.open_nursery() as n:
            await n.start(pool.run)
            await trio.sleep(1)  # in flight at the provider
            outer.start_soon(call, 3)
            await trio.sleep(0.05)  # in the batching window
            n.cancel_scope.cancel()
        t0 = trio.current_time()
    assert trio.current_time() == t0 and len(res) == 4
    assert all("pool stopped" in str(r) for r in res)


async def test_429_storm_never_exceeds_our_limit_and_settles(
    autojump_clock: Any, nursery: trio.Nursery, provider: Provider
) -> None:
    # A provider that allows 10 calls/s (per JSON-RPC call, like Helius) behind a pool
    # configured for 20/s: it answers 429 + Retry-After above its rate.
    allowance = {"tokens": 10.0, "at": trio.current_time()}
    sent_at: list[float] = []
    throttled = 0

    def provider_limit(request: httpx.Request, body: Any) -> httpx.Response | None:
        nonlocal throttled
        now = trio.current_time()
        cost = len(body) if isinstance(body, list) else 1
        sent_at.extend([now] * cost)
        allowance["tokens"] = min(10.0, allowance["tokens"] + (now - allowance["at"]) * 10)
        allowance["at"] = now
        if allowance["tokens"] < cost:
            throttled += 1
            provider.script.append(provider_limit)
            return httpx.Response(429, headers={"Retry-After": "1"})
        allowance["tokens"] -= cost
        provider.script.append(provider_limit)
        return None

    provider.script.append(provider_limit)
    limiter = RateLimiter(20)
    pool = Pool(make_cfg(max_retries=10, max_batch_size=1, batch_window_ms=0, request_timeout=600), limiter,
                transport=httpx.MockTransport(provider))
    await nursery.start(pool.run)
    results: list[Any] = []

    async def call(i: int) -> None:
        results.append(await pool.execute("getSlot", [{"minContextSlot": i}]))

    async with trio.open_nursery() as calls:
        for i in range(200):
            calls.start_soon(call, i)
    assert len(results) == 200  # every caller got its answer in the end
    # What we sent never exceeded our own limit: at most rate + burst in any second.
    for t in sent_at:
        assert sum(1 for u in sent_at if t <= u < t + 1.0) <= 20 + 20
    # The adaptive limiter backed off: far fewer 429s than calls.
    assert limiter.stats()["penalties"] >= 1
    assert throttled < 60, throttled


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.sampled_from(["getSlot", "getProgramAccounts"]), st.integers(0, 3000)), max_size=60),
    max_items=st.integers(1, 20),
    max_bytes=st.integers(1024, 20_000),
)
def test_pack_respects_every_cap_and_keeps_every_call(
    sizes: list[tuple[str, int]], max_items: int, max_bytes: int
) -> None:
    from edgestate.upstream.batching import Wire, pack

    wires = [Wire(method, [{"pad": "x" * n}]) for method, n in sizes]
    batches = pack(wires, max_items=max_items, max_bytes=max_bytes, per_method={"getProgramAccounts": 3})
    assert [w for b in batches for w in b] == wires  # nothing lost, order kept
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        assert sum(w.method == "getProgramAccounts" for w in batch) <= 3
        body = json.dumps([{"jsonrpc": "2.0", "id": 10**12 - 1, "method": w.method, "params": w.params} for w in batch],
                          separators=(",", ":"))
        assert len(batch) == 1 or len(body) <= max_bytes  # only a lone oversized call may exceed it
