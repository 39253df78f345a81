"""Each client's share of the upstream budget for the lookup routes.

:class:`LookupLimiter` (``api.lookup_per_client_rps``) counts what a lookup may cost
upstream: the routes that reach the providers on a miss (``GET /api/price/{mint}``,
``POST /api/tokens/balances``) charge their cost in upstream calls, so that a few
clients posting 1,000-wallet lookups cannot take the whole
``upstream.max_requests_per_second`` budget from everyone else. Synchronous (no I/O,
no awaits) and on Trio's clock. (The request-count limiter, ``api.per_client_rps``,
is ``views.ClientLimiter``; it could move here.)

At most ``max_clients`` buckets are kept (least recently seen dropped first): memory is
bounded whatever the number of addresses; an address that comes back after being
dropped starts with a full bucket.
"""

from __future__ import annotations

import math

import cachetools
import trio

from .errors import RateLimited

# What a balances lookup may cost upstream: one getMultipleAccounts per 100 wallets
# (agave's MAX_MULTIPLE_ACCOUNTS); the mint read is cached and shared by every client.
WALLETS_PER_CALL = 100
# A price lookup: at most one id in a price API call (the call's other ids ride along).
PRICE_COST = 1.0
_MAX_CLIENTS = 100_000


def balances_cost(wallets: int) -> float:
    """Upstream calls a balances lookup of ``wallets`` may cost (at least 1).

    >>> balances_cost(1), balances_cost(100), balances_cost(1000)
    (1.0, 1.0, 10.0)
    """
    return float(max(1, math.ceil(wallets / WALLETS_PER_CALL)))


class LookupLimiter:
    """Each client's share of the upstream budget, in upstream calls per second.

    A client's bucket refills at ``rate`` units per second and holds at most
    ``burst``: two seconds' worth, and never less than ``max_cost`` so that the
    largest allowed request (e.g. ``balances_cost(api.max_wallets)``) passes when the
    bucket is full. A request is admitted when its whole cost is in the bucket, and
    then takes it; otherwise it is refused and takes nothing (a refused client is
    not pushed further back).

    Args:
        rate: units per second per client; ``<= 0`` turns the limiter off.
        max_cost: the most one request may cost (costs above it are charged as it).
        max_clients: buckets kept (least recently seen dropped first).
    """

    def __init__(self, rate: float, *, max_cost: float = 1.0, max_clients: int = _MAX_CLIENTS) -> None:
        self.rate = rate
        self.max_cost = max(1.0, max_cost)
        self.burst = max(2.0 * rate, self.max_cost)
        self.refused = 0
        self._buckets: cachetools.LRUCache[str, list[float]] = cachetools.LRUCache(maxsize=max_clients)

    def __repr__(self) -> str:
        return f"<LookupLimiter {self.rate:g}/s burst={self.burst:g} clients={len(self._buckets)}>"

    def tokens(self, address: str) -> float:
        """What ``address`` may spend right now (``burst`` for an unknown client)."""
        bucket = self._buckets.get(address)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket[0] + (trio.current_time() - bucket[1]) * self.rate)

    def charge(self, address: str, cost: float) -> None:
        """Take ``cost`` from ``address``'s bucket, or refuse the request.

        Raises:
            ValueError: ``cost`` is negative or not finite.
            RateLimited: the bucket holds less than ``cost``; ``retry_after`` is
                when it will hold enough (the HTTP layer answers 429 + Retry-After).
        """
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"lookup cost must be a finite number >= 0, got {cost!r}")
        if self.rate <= 0:
            return
        cost = min(cost, self.max_cost)
        now = trio.current_time()
        tokens = self.tokens(address)
        if tokens < cost:
            self.refused += 1
            self._buckets[address] = [tokens, now]
            wait = (cost - tokens) / self.rate
            raise RateLimited(
                f"over this client's share of upstream lookups ({self.rate:g} upstream calls/s,"
                f" this request costs {cost:g}); retry in {wait:.1f}s",
                retry_after=wait,
            )
        self._buckets[address] = [tokens - cost, now]

    def stats(self) -> dict[str, float | int]:
        """A JSON-ready snapshot."""
        return {"rate": self.rate, "burst": self.burst, "clients": len(self._buckets), "refused": self.refused}
