"""The /rpc proxy: the frontend's own Solana JSON-RPC (POST) and PubSub (WebSocket).

    policy.py    allowlist, param validation, canonical params, cache classes
    proxy.py     POST /rpc: cache, single-flight, pool, merged signature statuses, sends
    mux.py       shared upstream PubSub subscriptions (sans-IO registry + session)
    session.py   GET /rpc: one client's PubSub protocol, non-blocking writes

:class:`RpcService` builds and runs them; the app calls ``service.proxy.handle`` and
the front door ``service.accept_ws`` (its upgrade table).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import trio

from ..cache import Cache
from ..config import Config
from ..heads import Request
from ..upstream.pool import Pool
from ..upstream.ratelimit import RateLimiter
from .mux import Mux
from .proxy import RpcProxy
from .session import RpcSockets, accept_rpc_ws

__all__ = ["RpcProxy", "RpcService"]


class RpcService:
    """Everything behind /rpc for one server process.

    Args:
        cfg: the configuration (``rpc``, ``upstream``, ``cache``, ``ws``, ``lottery``).
        pool: the shared upstream pool.
        cache: the shared cache.
        limiter: the upstream rate limiter.
    """

    def __init__(self, cfg: Config, pool: Pool, cache: Cache, limiter: RateLimiter) -> None:
        self.cfg = cfg
        self.proxy = RpcProxy(cfg, pool, cache, limiter)
        self.mux = Mux(cfg.upstream.pubsub_url, read=pool.execute, on_account_change=self.proxy.account_changed,
                       request_timeout=cfg.upstream.request_timeout, ping_interval=cfg.ws.ping_interval)
        self.sockets = RpcSockets(cfg, self.mux)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the send pool, the status merger and the upstream PubSub until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.proxy.run)
            await nursery.start(self.mux.run)
            task_status.started()

    async def accept_ws(self, stream: trio.SocketStream, request: Request, rest: bytes
                        ) -> Coroutine[Any, Any, None] | None:
        """The front door's upgrade handler for ``GET /rpc``: handshake, then the session to await."""
        return await accept_rpc_ws(stream, request, rest, self.sockets)

    def stats(self) -> dict[str, Any]:
        """The /stats ``rpc`` section: HTTP calls, cache per method, PubSub sharing."""
        return {**self.proxy.stats(), "pubsub": {**self.mux.stats(), "clients": self.sockets.stats()}}
