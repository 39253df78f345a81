"""Per-client limiters (limits.py) on virtual time, and the lookup share over HTTP."""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from solders.keypair import Keypair

from edgestate.config import ApiConfig
from edgestate.errors import RateLimited
from edgestate.limits import PRICE_COST, LookupLimiter, balances_cost
from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


def test_balances_cost_counts_get_multiple_accounts_calls() -> None:
    assert [balances_cost(n) for n in (0, 1, 100, 101, 1000)] == [1.0, 1.0, 1.0, 2.0, 10.0]
    assert PRICE_COST == 1.0


def test_default_is_on_and_leaves_room_for_others() -> None:
    # The finding: with no per-client share four clients took the whole 100 calls/s.
    rate = ApiConfig().lookup_per_client_rps
    assert rate > 0
    assert 4 * rate < 100 / 2  # four heavy clients take less than half the default budget


async def test_burst_then_refill_exactly(autojump_clock: trio.testing.MockClock) -> None:
    lim = LookupLimiter(10.0, max_cost=balances_cost(1000))
    assert lim.burst == 20.0
    lim.charge("a", 10.0)
    lim.charge("a", 10.0)  # two 1,000-wallet lookups at once: the burst
    with pytest.raises(RateLimited) as info:
        lim.charge("a", 10.0)
    assert info.value.retry_after == pytest.approx(1.0)
    assert lim.tokens("a") == pytest.approx(0.0)  # a refused request took nothing
    await trio.sleep(0.999)
    with pytest.raises(RateLimited):
        lim.charge("a", 10.0)
    await trio.sleep(0.001)
    lim.charge("a", 10.0)
    assert lim.refused == 2
    lim.charge("b", 10.0)  # another client has its own bucket


async def test_largest_request_fits_a_small_rate(autojump_clock: trio.testing.MockClock) -> None:
    lim = LookupLimiter(1.0, max_cost=10.0)
    assert lim.burst == 10.0  # two seconds' worth would never admit a 1,000-wallet lookup
    lim.charge("a", 10.0)
    with pytest.raises(RateLimited) as info:
        lim.charge("a", 1.0)
    assert info.value.retry_after == pytest.approx(1.0)
    lim.charge("b", 50.0)  # charged as max_cost
    assert lim.tokens("b") == pytest.approx(0.0)


async def test_off_and_bad_costs(autojump_clock: trio.testing.MockClock) -> None:
    off = LookupLimiter(0.0, max_cost=10.0)
    for _ in range(1000):
        off.charge("a", 10.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            off.charge("a", bad)


async def test_buckets_are_bounded(autojump_clock: trio.testing.MockClock) -> None:
    lim = LookupLimiter(1.0, max_cost=2.0, max_clients=100)
    for i in range(1000):
        lim.charge(f"10.0.{i // 256}.{i % 256}", 2.0)
    assert lim.stats()["clients"] == 100


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.sampled_from([1.0, 3.0, 10.0])), min_size=1, max_size=60))
def test_admitted_cost_never_exceeds_burst_plus_rate_times_time(steps: list[tuple[float, float]]) -> None:
    rate = 10.0

    async def main() -> None:
        lim = LookupLimiter(rate, max_cost=10.0)
        t0 = trio.current_time()
        admitted = 0.0
        for gap, cost in steps:
            await trio.sleep(gap)
            try:
                lim.charge("a", cost)
            except RateLimited as exc:
                assert exc.retry_after > 0
            else:
                admitted += cost
            assert admitted <= lim.burst + rate * (trio.current_time() - t0) + 1e-9

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _wallets(n: int) -> list[str]:
    return [str(Keypair().pubkey()) for _ in range(n)]


async def test_four_clients_of_1000_wallet_lookups_get_their_share_only(nursery, sim):
    """The finding: four clients posting 1,000-wallet lookups used the whole upstream budget."""
    cfg = make_config(sim.url, state=FAR, api={"trusted_proxies": ["127.0.0.1/32"]})
    server = await start_server(nursery, cfg)
    await wait_for(lambda: server.services.state.ready()[0])
    mint = str(Keypair().pubkey())
    sim.world.add_mint(mint, 6)
    statuses: dict[str, list[int]] = {f"198.51.100.{i}": [] for i in range(4)}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

        async def lookup(address: str) -> None:
            body = {"wallets": _wallets(1000), "tokenMint": mint}
            resp = await client.post("/api/tokens/balances", json=body, headers={"x-forwarded-for": address})
            statuses[address].append(resp.status_code)
            if resp.status_code == 429:
                assert int(resp.headers["retry-after"]) >= 1

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for address in statuses:
                    for _ in range(5):
                        n.start_soon(lookup, address)
        # Each client: its burst (two lookups of cost 10 at 10 calls/s), the rest 429.
        for address, got in statuses.items():
            assert sorted(got) == [200, 200, 429, 429, 429], (address, got)
        other = await client.post("/api/tokens/balances", json={"wallets": _wallets(3), "tokenMint": mint},
                                  headers={"x-forwarded-for": "192.0.2.7"})
        assert other.status_code == 200  # a fifth client still gets its lookups through
    await server.shutdown()
