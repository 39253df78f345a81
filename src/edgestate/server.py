"""serve(): the one nursery that owns every long-lived task of the server.

    serve
    ├── simulator + demo drift          (--demo only)
    ├── pool.run                        upstream JSON-RPC workers, batcher, prober
    ├── prices.run                      price API client (batched ids)
    ├── refresher.run                   price / participants pollers, jackpot PubSub + fallback
    ├── hub.run                         fan-out of each new snapshot, heartbeat
    ├── http.run                        Hypercorn's protocol for each HTTP connection
    └── front door                      accepts; GET /ws → ws.serve_ws, in-memory GETs →
                                        frontdoor.RawHttp, everything else → Hypercorn

One listening socket serves all: the front door peeks at each new connection's request
head; WebSocket clients of /ws go to our own fan-out path (see broadcast.py for why), the
hot in-memory GETs are answered raw (frontdoor.py), all other HTTP goes to the Quart-Trio
app through Hypercorn's HTTP/1.1 protocol.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from . import __version__, frontdoor, wsframes
from .broadcast import Hub
from .cache import Cache
from .config import Config, redact
from .errors import EdgeStateError
from .feed import ParentFeed, ParentPrices, ParentRpc
from .refresh import Refresher
from .rpc import RpcService
from .state import SharedState
from .upstream.pool import Pool
from .upstream.prices import PriceClient
from .upstream.ratelimit import RateLimiter
from .upstream.rpc import SolanaRpc
from .ws import serve_ws

log = logging.getLogger("edgestate.server")

_BACKLOG = 4096  # connect bursts of thousands of WebSocket clients
_FIRST_REQUEST_TIMEOUT = 10.0  # a new connection that sends no request head in time goes to Hypercorn


class ListenError(EdgeStateError):
    """The listening address cannot be bound (busy, not permitted, unknown host)."""


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
    rpc_proxy: RpcService | None = None  # /rpc (issue 12); None in feed mode or with rpc.enabled = false
    # Set by workers.py in a worker process: {"id", "pid", "role", ...}; /stats server.worker.
    worker: dict[str, Any] | None = None
    started_at: float = field(default_factory=trio.current_time)
    # More /stats sections by name (e.g. "api", added by the HTTP app): name -> stats().
    extra_stats: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)


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
        price_client = PriceClient(cfg.price, cache, batch_window=cfg.upstream.batch_window_ms / 1000)
        refresher = Refresher(cfg, state, solana, price_client, limiter=limiter)
        rpc, prices = solana, price_client
    return Services(
        cfg=cfg,
        state=state,
        hub=Hub(cfg.ws, state),
        limiter=limiter,
        cache=cache,
        pool=pool,
        rpc=rpc,
        prices=prices,
        refresher=refresher,
        feed=feed,
        rpc_proxy=RpcService(cfg, pool, cache, limiter) if pool is not None and cfg.rpc.enabled else None,
    )


def _split_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


async def open_listener(bind: str, *, reuse_port: bool = False) -> trio.SocketListener:
    """Bind ``HOST:PORT`` (port 0 picks a free one).

    Args:
        reuse_port: set SO_REUSEPORT, so that several processes (workers) listen on the
            same port and the kernel spreads new connections over them.

    Raises:
        ListenError: one line saying why (address in use, permission, bad host).
    """
    host, port = _split_bind(bind)
    try:
        if reuse_port:
            listeners = [await _reuse_port_listener(host, port)]
        else:
            listeners = await trio.open_tcp_listeners(port, host=host, backlog=_BACKLOG)
    except OSError as exc:
        why = {errno.EADDRINUSE: "address already in use", errno.EACCES: "permission denied"}.get(
            exc.errno or 0, exc.strerror or str(exc)
        )
        raise ListenError(f"cannot listen on {bind}: {why}") from None
    # One address (the first) is enough: bind is a single HOST:PORT.
    for extra in listeners[1:]:
        await extra.aclose()
    return listeners[0]


async def _reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    family, type_, proto, _, addr = (
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(addr)
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_url(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class EmbeddedHypercorn:
    """Hypercorn's HTTP protocol for connections our front door accepted.

    This is what ``hypercorn.trio.serve`` does, minus the accept loop: the ASGI lifespan
    around a nursery of per-connection protocol tasks.
    """

    def __init__(self, app: Any, cfg: Config) -> None:
        hcfg = hypercorn.config.Config()
        hcfg.accesslog = None
        hcfg.errorlog = logging.getLogger("hypercorn.error")
        hcfg.graceful_timeout = cfg.server.graceful_timeout
        hcfg.keep_alive_timeout = 5.0
        hcfg.h11_max_incomplete_size = 16 * 1024
        self._hcfg = hcfg
        self._app = wrap_app(app, hcfg.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}
        self._connections: trio.Nursery | None = None
        self._stop = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        lifespan = Lifespan(self._app, self._hcfg, self._lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as connections:
                self._connections = connections
                task_status.started()
                await self._stop.wait()
                # Idle keep-alive connections close now; busy ones after their response.
                await self._context.terminated.set()
                connections.cancel_scope.deadline = trio.current_time() + self._hcfg.graceful_timeout
            self._connections = None
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection with Hypercorn's protocol."""
        if self._connections is None:  # shutting down
            stream.socket.close()
            return
        self._connections.start_soon(self._serve, stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        # TCPServer is annotated for SSLStream but handles a plain SocketStream (its non-TLS path).
        server = TCPServer(self._app, self._hcfg, self._context, ConnectionState(self._lifespan_state.copy()), stream)  # type: ignore[arg-type]
        try:
            await server.run()
        finally:
            # Hypercorn's own close is skipped when the shutdown deadline cancels it.
            stream.socket.close()

    def stop(self) -> None:
        self._stop.set()


async def serve(
    cfg: Config,
    *,
    demo: bool = False,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, Services]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until SIGINT/SIGTERM (or ``stop`` is set), then shut down gracefully.

    ``task_status.started((url, services))`` once the port is bound and the services run.

    Raises:
        ListenError: the bind address cannot be used.
    """
    from .http import create_app  # deferred: the app module imports Quart, heavy at CLI startup

    stop = trio.Event() if stop is None else stop
    listener = await open_listener(cfg.server.bind, reuse_port=cfg.server.reuse_port)
    url = bound_url(listener)
    async with trio.open_nursery() as services_nursery:
        if demo:
            cfg = await _start_demo(cfg, services_nursery)
        services = build_services(cfg)
        if services.feed is not None:  # feed mode: the parent is our only upstream
            await services_nursery.start(services.hub.run)
            await services_nursery.start(services.feed.run)
        else:
            assert services.pool is not None and services.refresher is not None
            assert isinstance(services.prices, PriceClient)
            await services_nursery.start(services.pool.run)
            await services_nursery.start(services.prices.run)
            await services_nursery.start(services.hub.run)
            await services_nursery.start(services.refresher.run)
        if services.rpc_proxy is not None:
            services.extra_stats["rpc"] = services.rpc_proxy.stats
            await services_nursery.start(services.rpc_proxy.run)
        app = create_app(services)
        http = EmbeddedHypercorn(app, cfg)
        raw_http = frontdoor.RawHttp(app)
        await services_nursery.start(http.run)
        services_nursery.start_soon(_watch_signals, stop)
        _log_startup(cfg, url, demo)

        async with trio.open_nursery() as ws_nursery:
            with trio.CancelScope() as accepting:

                async def dispatch(stream: trio.SocketStream) -> None:
                    head = await frontdoor.peek_head(stream, _FIRST_REQUEST_TIMEOUT)
                    kind = frontdoor.classify(head, raw_http.is_fast)
                    if kind is frontdoor.Kind.WEBSOCKET:
                        await serve_ws(stream, services.hub, cfg)
                    elif kind is frontdoor.Kind.RPC_WS and services.rpc_proxy is not None:
                        await services.rpc_proxy.serve_ws(stream)
                    elif kind is frontdoor.Kind.FAST and head is not None and await raw_http.serve(stream, head):
                        pass
                    else:
                        http.handle(stream)  # Hypercorn's nursery owns it from here

                services_nursery.start_soon(_stop_when, stop, accepting)
                task_status.started((url, services))
                await _accept_loop(listener, dispatch, ws_nursery)
            # Shutdown: no new connections; WebSocket clients get 1001 at once.
            log.info("shutting down: closing %d WebSocket clients, draining HTTP (up to %gs)",
                     len(services.hub), cfg.server.graceful_timeout)
            services.hub.close_all(wsframes.CLOSE_GOING_AWAY, "server shutting down")
            http.stop()
            raw_http.stop()
            ws_nursery.cancel_scope.deadline = trio.current_time() + cfg.server.graceful_timeout
        services_nursery.cancel_scope.cancel(reason="server stopped")
    log.info("stopped")


async def _accept_loop(
    listener: trio.SocketListener,
    dispatch: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept until cancelled; each connection is dispatched in its own task.

    (Not ``trio.serve_listeners``: it closes a stream when its handler returns, and HTTP
    connections live on in Hypercorn's nursery.)
    """
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    # Out of file descriptors: existing clients keep being served; retry soon.
                    log.warning("accept failed (%s): at the open-files limit?", errno.errorcode.get(exc.errno or 0))
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(dispatch, stream)


async def _stop_when(stop: trio.Event, accepting: trio.CancelScope) -> None:
    await stop.wait()
    accepting.cancel(reason="shutdown requested")


async def _watch_signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if stop.is_set():
                log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: graceful shutdown", signal.Signals(signum).name)
            stop.set()


async def _start_demo(cfg: Config, nursery: trio.Nursery) -> Config:
    """Start the simulated upstream in-process and point ``cfg`` at it."""
    from .sim import World, run_demo_drift, serve_simulator

    world = World.from_config(cfg)
    sim_url = await nursery.start(serve_simulator, world, "127.0.0.1:0")
    nursery.start_soon(run_demo_drift, world)
    log.info("demo mode: simulated upstream at %s (no network, no keys)", sim_url)
    cfg = cfg.replace("upstream", rpc_url=[sim_url], ws_url="ws" + sim_url[4:])
    return cfg.replace("price", url=sim_url + "/price/v3")


def _log_startup(cfg: Config, url: str, demo: bool) -> None:
    up, st = cfg.upstream, cfg.state
    log.info("edgestate %s listening on %s (HTTP + WebSocket /ws)%s", __version__, url, " [demo]" if demo else "")
    if up.parent:
        log.info("feed mode: state and lookups from parent %s (no provider calls)",
                 ", ".join(redact(u) for u in up.parent))
        return
    log.info("upstream RPC %s, PubSub %s, prices %s", ", ".join(redact(u) for u in up.rpc_urls),
             redact(up.pubsub_url), redact(cfg.price.url))
    log.info(
        "limits: %d connections, %g req/s, batch window %gms; intervals: price %gs, participants %gs, "
        "fallback polling %gs; cache ttl %gs",
        up.max_connections, up.max_requests_per_second, up.batch_window_ms, st.price_interval,
        st.participants_interval, st.polling_interval, cfg.cache.ttl,
    )
