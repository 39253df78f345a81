"""SolanaRpc: parsing, chunking, token balances; and Pool + SolanaRpc over real HTTP to the simulator."""

from __future__ import annotations

import base64
import json
import types
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from solders.pubkey import Pubkey
from solders.token.associated import get_associated_token_address
from solders.token.state import Mint, TokenAccount, TokenAccountState

from edgestate.cache import Cache
from edgestate.config import CacheConfig, Config, UpstreamConfig
from edgestate.errors import UpstreamError
from edgestate.upstream.pool import Pool
from edgestate.upstream.ratelimit import RateLimiter
from edgestate.upstream.rpc import (
    TOKEN_2022_PROGRAM_ID,
    TOKEN_PROGRAM_ID,
    AccountData,
    InvalidMint,
    Slotted,
    SolanaRpc,
)

SYSTEM = "11111111111111111111111111111111"


def key() -> str:
    return str(Pubkey.new_unique())


class Chain:
    """A fake RPC provider holding raw accounts; answers base64, honours dataSlice."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[int, str, bytes]] = {}
        self.items: list[dict[str, Any]] = []
        self.http_requests = 0
        self.override: Callable[[dict[str, Any]], Any] | None = None  # method item -> result
        self.fail = False

    def encode(self, pubkey: str, config: dict[str, Any]) -> dict[str, Any] | None:
        if pubkey not in self.accounts:
            return None
        lamports, owner, data = self.accounts[pubkey]
        if "dataSlice" in config:
            s = config["dataSlice"]
            data = data[s["offset"] : s["offset"] + s["length"]]
        return {
            "lamports": lamports,
            "owner": owner,
            "data": [base64.b64encode(data).decode(), "base64"],
            "executable": False,
            "rentEpoch": 0,
            "space": len(data),
        }

    def answer(self, item: dict[str, Any]) -> dict[str, Any]:
        self.items.append(item)
        method, params = item["method"], item["params"]
        config = params[1] if len(params) > 1 else {}
        ctx = {"slot": 77}
        if self.override is not None:
            result = self.override(item)
        elif method == "getAccountInfo":
            result = {"context": ctx, "value": self.encode(params[0], config)}
        elif method == "getBalance":
            result = {"context": ctx, "value": self.accounts.get(params[0], (0, "", b""))[0]}
        elif method == "getMultipleAccounts":
            result = {"context": ctx, "value": [self.encode(k, config) for k in params[0]]}
        elif method == "getProgramAccounts":
            owned = [k for k, (_, owner, _) in self.accounts.items() if owner == params[0]]
            result = {"context": ctx, "value": [{"pubkey": k, "account": self.encode(k, config)} for k in owned]}
        else:
            return {"jsonrpc": "2.0", "id": item["id"], "error": {"code": -32601, "message": "Method not found"}}
        return {"jsonrpc": "2.0", "id": item["id"], "result": result}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.http_requests += 1
        if self.fail:
            return httpx.Response(503)
        body = json.loads(request.content)
        out = [self.answer(i) for i in body] if isinstance(body, list) else self.answer(body)
        return httpx.Response(200, json=out)

    def methods(self) -> list[str]:
        return [i["method"] for i in self.items]


@pytest.fixture
def chain() -> Chain:
    return Chain()


@pytest.fixture
async def rpc(nursery: trio.Nursery, chain: Chain) -> SolanaRpc:
    cfg = UpstreamConfig(rpc_url=("https://rpc.example.com/",), max_retries=1, request_timeout=10.0)
    pool = Pool(cfg, RateLimiter(1e6), transport=httpx.MockTransport(chain))
    await nursery.start(pool.run)
    return SolanaRpc(pool, Cache(CacheConfig(ttl=5.0, max_stale=300.0)))


async def test_balance_and_account_parsed(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    a, missing = key(), key()
    chain.accounts[a] = (123, SYSTEM, b"\x01\x02\x03")
    assert await rpc.get_balance(a) == Slotted(123, 77)
    assert await rpc.get_balance(missing, cached=False) == Slotted(0, 77)
    got = await rpc.get_account(a)
    assert got.value == AccountData(lamports=123, owner=SYSTEM, data=b"\x01\x02\x03", executable=False)
    assert got.slot == 77 and not got.stale
    assert (await rpc.get_account(Pubkey.from_string(missing))).value is None
    assert chain.items[0]["params"] == [a, {"commitment": "confirmed"}]
    assert chain.items[2]["params"][1] == {"commitment": "confirmed", "encoding": "base64"}


async def test_invalid_pubkeys_raise_value_error(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    with pytest.raises(ValueError, match="invalid pubkey"):
        await rpc.get_balance("not-a-key")
    with pytest.raises(ValueError, match="pubkey #1"):
        await rpc.get_multiple_accounts([key(), "0OIl"])
    with pytest.raises(ValueError, match="wallet"):
        await rpc.get_token_balances(["nope"], key())
    assert chain.items == []


async def test_concurrent_identical_reads_cost_one_call(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    a = key()
    chain.accounts[a] = (5, SYSTEM, b"")
    async with trio.open_nursery() as n:
        for _ in range(100):
            n.start_soon(rpc.get_balance, a)
    assert chain.methods() == ["getBalance"]


async def test_stale_value_marked_when_upstream_fails(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    a = key()
    chain.accounts[a] = (5, SYSTEM, b"")
    await rpc.get_balance(a)
    await trio.sleep(10)  # past the TTL
    chain.fail = True
    got = await rpc.get_balance(a)
    assert got.value == 5 and got.stale and got.age >= 10


async def test_250_keys_read_in_three_chunks_in_order(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    keys = [key() for _ in range(250)]
    for i, k in enumerate(keys):
        if i % 3:
            chain.accounts[k] = (i, SYSTEM, bytes([i % 256]))
    got = await rpc.get_multiple_accounts(keys)
    assert chain.methods() == ["getMultipleAccounts"] * 3
    assert sorted(len(i["params"][0]) for i in chain.items) == [50, 100, 100]
    assert [a.lamports if a else None for a in got.value] == [i if i % 3 else None for i in range(250)]
    assert got.slot == 77


async def test_count_program_accounts(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    program = key()
    for _ in range(7):
        chain.accounts[key()] = (1, program, b"x" * 80)
    filters = (
        types.MappingProxyType({"dataSize": 80}),
        types.MappingProxyType({"memcmp": {"offset": 8, "bytes": "3"}}),
    )
    got = await rpc.count_program_accounts(program, filters)
    assert got == Slotted(7, 77)
    (item,) = chain.items
    assert item["params"] == [
        program,
        {
            "commitment": "confirmed",
            "encoding": "base64",
            "dataSlice": {"offset": 0, "length": 0},
            "filters": [{"dataSize": 80}, {"memcmp": {"offset": 8, "bytes": "3"}}],
            "withContext": True,
        },
    ]
    chain.override = lambda item: [{"pubkey": key()} for _ in range(3)]  # a provider ignoring withContext
    assert (await rpc.count_program_accounts(program, [], cached=False)).value == 3


@pytest.mark.parametrize(
    ("method", "result", "needle"),
    [
        ("get_balance", {"value": 1}, "context.slot"),
        ("get_balance", {"context": {"slot": 1}, "value": "1"}, "value"),
        ("get_balance", [1, 2], "expected an object"),
        ("get_account", {"context": {"slot": 1}, "value": {"lamports": 1}}, "owner"),
        (
            "get_account",
            {
                "context": {"slot": 1},
                "value": {"lamports": 1, "owner": SYSTEM, "data": ["!!", "base64"], "executable": False},
            },
            "base64",
        ),
        (
            "get_account",
            {
                "context": {"slot": 1},
                "value": {"lamports": 1, "owner": "xx", "data": ["", "base64"], "executable": False},
            },
            "pubkey",
        ),
        ("get_multiple_accounts", {"context": {"slot": 1}, "value": [None]}, "list of 2"),
        ("get_multiple_accounts", {"context": {"slot": 1}, "value": [None, 7]}, "not an object"),
    ],
)
async def test_malformed_replies_raise_upstream_error(
    autojump_clock: Any, rpc: SolanaRpc, chain: Chain, method: str, result: Any, needle: str
) -> None:
    chain.override = lambda item: result
    arg: Any = [key(), key()] if method == "get_multiple_accounts" else key()
    with pytest.raises(UpstreamError, match="unexpected reply shape") as info:
        await getattr(rpc, method)(arg, cached=False)
    assert needle in str(info.value)


# ---- token balances ---------------------------------------------------------------------


def add_mint(chain: Chain, program: str, decimals: int, extra: int = 0) -> str:
    mint = key()
    data = bytes(Mint(None, 10**12, decimals, True, None))
    if extra:  # Token-2022 with extensions: padding to 165, account type 1 (mint), TLV space
        data += b"\x00" * 83 + b"\x01" + b"\x00" * extra
    chain.accounts[mint] = (1_461_600, program, data)
    return mint


def add_token_account(chain: Chain, program: str, wallet: str, mint: str, amount: int) -> None:
    ata = get_associated_token_address(
        Pubkey.from_string(wallet), Pubkey.from_string(mint), Pubkey.from_string(program)
    )
    acct = TokenAccount(
        Pubkey.from_string(mint), Pubkey.from_string(wallet), amount, None, TokenAccountState.Initialized, None, 0, None
    )
    chain.accounts[str(ata)] = (
        2_039_280,
        program,
        bytes(acct) + (b"\x00" * 20 if program == TOKEN_2022_PROGRAM_ID else b""),
    )


@pytest.mark.parametrize("program", [TOKEN_PROGRAM_ID, TOKEN_2022_PROGRAM_ID])
async def test_token_balances(autojump_clock: Any, rpc: SolanaRpc, chain: Chain, program: str) -> None:
    mint = add_mint(chain, program, 6, extra=100 if program == TOKEN_2022_PROGRAM_ID else 0)
    wallets = [key() for _ in range(250)]
    for i, w in enumerate(wallets[:200]):
        add_token_account(chain, program, w, mint, i * 1_500_000)
    other = TOKEN_PROGRAM_ID if program == TOKEN_2022_PROGRAM_ID else TOKEN_2022_PROGRAM_ID
    add_token_account(chain, other, wallets[249], mint, 10**9)  # wrong program's ATA: not counted
    got = await rpc.get_token_balances(wallets + wallets[:5], mint)
    assert got == {w: (i * 1.5 if i < 200 else 0.0) for i, w in enumerate(wallets)}
    assert chain.methods() == ["getAccountInfo"] + ["getMultipleAccounts"] * 3
    assert all(i["params"][1]["dataSlice"] == {"offset": 0, "length": 72} for i in chain.items[1:])


async def test_token_balances_bad_mint(autojump_clock: Any, rpc: SolanaRpc, chain: Chain) -> None:
    with pytest.raises(InvalidMint, match="not found"):
        await rpc.get_token_balances([key()], key())
    not_mint = key()
    chain.accounts[not_mint] = (1, SYSTEM, b"\x00" * 82)
    with pytest.raises(InvalidMint, match="not an SPL Token or Token-2022 mint"):
        await rpc.get_token_balances([key()], not_mint)
    assert issubclass(InvalidMint, ValueError)


# ---- over real HTTP against the simulator -----------------------------------------------


async def sim_rpc(nursery: trio.Nursery, clock: Any = None, **upstream: Any) -> tuple[Any, SolanaRpc]:
    from edgestate.sim import World, serve_simulator

    world = World.from_config(Config(), clock=clock)
    url = await nursery.start(serve_simulator, world)
    cfg = UpstreamConfig(rpc_url=(url + "/",), request_timeout=10.0, **upstream)
    pool = Pool(cfg, RateLimiter(1e6))
    await nursery.start(pool.run)
    return world, SolanaRpc(pool, Cache(CacheConfig()))


async def test_sim_1000_identical_reads_one_upstream_call(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery)
        got: list[int] = []

        async def read() -> None:
            got.append((await rpc.get_balance(world.pot_account)).value)

        async with trio.open_nursery() as n:
            for _ in range(1000):
                n.start_soon(read)
        assert got == [12_500_000_000] * 1000
        assert world.counters()["rpc_calls"] == 1 and world.counters()["http_requests"] == 1


async def test_sim_200_single_reads_two_get_multiple_accounts(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery)
        keys = [key() for _ in range(199)] + [world.pot_account]
        got: dict[str, int] = {}

        async def read(k: str) -> None:
            got[k] = (await rpc.get_balance(k, cached=False)).value

        async with trio.open_nursery() as n:
            for k in keys:
                n.start_soon(read, k)
        assert got[world.pot_account] == 12_500_000_000 and sum(got.values()) == 12_500_000_000
        assert world.counters()["rpc_methods"] == {"getMultipleAccounts": 2}


async def test_sim_token_balances(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery)
        wallets = [key() for _ in range(150)]
        world.set_token_balance(wallets[3], world.token_mint, 2_500_000)
        got = await rpc.get_token_balances(wallets, world.token_mint)
        assert got[wallets[3]] == 2.5 and sum(got.values()) == 2.5
        assert world.counters()["rpc_methods"] == {"getAccountInfo": 1, "getMultipleAccounts": 2}


# ---- issue 11: exact Token-2022 balances, owner bytes, size-aware batches ------------------


async def _sim_ui_amount(world: Any, ata: str) -> Any:
    from edgestate.sim.app import METHODS

    return METHODS["getTokenAccountBalance"](world, [ata])["value"]["uiAmount"]


async def test_sim_token_2022_ui_amounts_with_interest_and_scaling(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        # The chain's clock stands still: interest accrues per second, and the RPC's answer
        # and the expected one below must be computed at the same second.
        frozen = trio.current_time()
        world, rpc = await sim_rpc(nursery, clock=lambda: frozen)
        now = world.unix_timestamp()
        year = 31_556_736
        interest_mint, scaled_mint = key(), key()
        world.add_mint(interest_mint, 6, "token-2022", interest_bearing={
            "initialization_timestamp": now - 2 * year, "pre_update_average_rate": 300,
            "last_update_timestamp": now - year, "current_rate": 500})
        world.add_mint(scaled_mint, 2, "token-2022", scaled_ui_amount={
            "multiplier": 1.5, "new_multiplier_effective_timestamp": now - 10, "new_multiplier": 2.25})
        wallets = [key() for _ in range(3)]
        for mint in (interest_mint, scaled_mint):
            atas = [world.set_token_balance(w, mint, 1_000_001 * (i + 1)) for i, w in enumerate(wallets)]
            got = await rpc.get_token_balances(wallets, mint)
            want = [await _sim_ui_amount(world, a) for a in atas]
            assert [got[w] for w in wallets] == want  # the RPC's own uiAmount, to the bit
            plain = [1_000_001 * (i + 1) / 10 ** (6 if mint == interest_mint else 2) for i in range(3)]
            assert want != plain  # the extensions really change it
        # The mint was read once for each; the clock rode along with the token accounts.
        methods = world.counters()["rpc_methods"]
        assert methods == {"getAccountInfo": 2, "getMultipleAccounts": 2}


async def test_a_token_account_of_another_owner_counts_as_none(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery)
        wallet, thief = key(), key()
        ata = world.set_token_balance(wallet, world.token_mint, 5_000_000)
        # Same address, but the token account's owner field names someone else.
        data = bytearray(world.accounts[ata].data)
        data[32:64] = bytes(Pubkey.from_string(thief))
        world.set_account(ata, 2_039_280, world.accounts[ata].owner, bytes(data))
        assert (await rpc.get_token_balances([wallet], world.token_mint)) == {wallet: 0.0}


async def test_a_token_account_is_not_accepted_as_a_mint(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery)
        owner = Pubkey(bytes([9] * 13 + [1] + [9] * 18))  # byte 45 of the account is 1
        ata = world.set_token_balance(str(owner), world.token_mint, 1)
        with pytest.raises(InvalidMint, match="not an SPL Token or Token-2022 mint"):
            await rpc.get_token_balances([key()], ata)


async def test_sim_1100_wallets_fit_under_agaves_body_limit(nursery: trio.Nursery) -> None:
    # Eleven getMultipleAccounts of 100 keys are ~53 KB as one batch; the simulator refuses
    # bodies over 50 KiB as agave does. Packed under 45 KiB, every call succeeds.
    with trio.fail_after(10):
        world, rpc = await sim_rpc(nursery, max_batch_size=100, max_requests_per_second=1e6)
        wallets = [key() for _ in range(1100)]
        world.set_token_balance(wallets[500], world.token_mint, 7_000_000)
        got = await rpc.get_token_balances(wallets, world.token_mint)
        assert got[wallets[500]] == 7.0 and len(got) == 1100
        assert world.counters()["http_413"] == 0
        assert rpc.pool.stats()["largest_body_bytes"] <= 46080
