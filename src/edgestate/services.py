"""Services: the components the app, /ws and /rpc read from, built once per process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .broadcast import Hub
from .cache import Cache
from .config import Config
from .feed import ParentFeed, ParentPrices, ParentRpc
from .refresh import Refresher
from .state import SharedState
from .telemetry import Telemetry
from .upstream.pool import Pool
from .upstream.prices import PriceClient
from .upstream.ratelimit import RateLimiter
from .upstream.rpc import SolanaRpc


@dataclass(slots=True, kw_only=True)
class Services:
    """Everything the HTTP app and the WebSocket path read from."""

    cfg: Config
    state: SharedState
    hub: Hub
    limiter: RateLimiter
    cache: Cache
    # Feed mode (upstream.parent set): no pool and no refresher, lookups go to the parent.
    pool: Pool | None
    rpc: SolanaRpc | ParentRpc
    prices: PriceClient | ParentPrices
    refresher: Refresher | None
    feed: ParentFeed | None = None
    # /rpc (issue 12): an rpc.RpcService set by server.serve (rpc/ imports views, which imports this module);
    # None in feed mode or with rpc.enabled = false.
    rpc_proxy: Any = None
    # Set by workers.py in a worker process: {"id", "pid", "role", ...}; /stats server.worker.
    worker: dict[str, Any] | None = None
    started_at: float = field(default_factory=trio.current_time)
    # More /stats sections by name (e.g. "api", added by the HTTP app): name -> stats().
    extra_stats: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    # Set by workers.py in a worker group: every member's /stats (GET /stats?scope=all).
    collect_all: Callable[[], dict[str, Any] | None] | None = None
    # Counters and histograms for /metrics, shared by the components above.
    telemetry: Telemetry = field(default_factory=Telemetry)
    # (host, port) of the server.internal_bind listener once bound: /stats, /metrics and
    # /status answer only there (None: no internal listener, they answer everywhere).
    internal_address: tuple[str, int] | None = None


def build_services(cfg: Config) -> Services:
    """Create the components (not started) for ``cfg``."""
    state = SharedState(cfg)
    limiter = RateLimiter(cfg.upstream.max_requests_per_second, name="upstream")
    cache = Cache(cfg.cache)
    pool: Pool | None = None
    refresher: Refresher | None = None
    feed: ParentFeed | None = None
    rpc: SolanaRpc | ParentRpc
    prices: PriceClient | ParentPrices
    if cfg.upstream.parent:
        # A child never talks to the providers: no pool, no PubSub, no pollers.
        feed = ParentFeed(cfg, state)
        rpc, prices = ParentRpc(feed, cache), ParentPrices(feed, cache)
    else:
        pool = Pool(cfg.upstream, limiter)
        solana = SolanaRpc(pool, cache, commitment=cfg.upstream.commitment)
        price_client = PriceClient(cfg.price, cache, batch_window=cfg.upstream.batch_window_ms / 1000,
                                   timeout=cfg.upstream.request_timeout)
        refresher = Refresher(cfg, state, solana, price_client, limiter=limiter)
        rpc, prices = solana, price_client
    telemetry = Telemetry()
    hub = Hub(cfg.ws, state)
    hub.telemetry = telemetry
    if pool is not None:
        pool.telemetry = telemetry
    if isinstance(prices, PriceClient):
        prices.telemetry = telemetry
    return Services(
        cfg=cfg,
        state=state,
        hub=hub,
        telemetry=telemetry,
        limiter=limiter,
        cache=cache,
        pool=pool,
        rpc=rpc,
        prices=prices,
        refresher=refresher,
        feed=feed,
    )
