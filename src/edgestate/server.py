"""serve(): the one nursery that owns every long-lived task of the server.

    serve
    ├── simulator + demo drift          (--demo only)
    ├── pool.run                        upstream JSON-RPC workers, batcher, prober
    ├── prices.run                      price API client (batched ids)
    ├── refresher.run                   price / participants pollers, jackpot PubSub + fallback
    ├── hub.run                         fan-out of each new snapshot, heartbeat
    ├── bridge.run                      the Quart app's lifespan (Hypercorn)
    └── connections                     listen.accept_forever → frontdoor.FrontDoor.handle per
                                        connection: GET /ws → ws.serve_ws, in-memory routes →
                                        views, everything else → Hypercorn (hypercorn_glue)

One listening socket serves all; each connection is one guarded task of the handler
nursery (frontdoor.py), so nothing one peer sends reaches the nursery of the others.
"""

from __future__ import annotations

import logging
import signal

import trio

from . import __version__, wsframes
from .config import Config, redact
from .frontdoor import FrontDoor
from .hypercorn_glue import HypercornBridge
from .listen import accept_forever, bound_url, connection_capacity, open_listener
from .rpc import RpcService
from .services import Services, build_services
from .upstream.prices import PriceClient

log = logging.getLogger("edgestate.server")


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
    from .api import create_app  # deferred: the app module imports Quart, heavy at CLI startup
    from .views import Views

    stop = trio.Event() if stop is None else stop
    capacity = connection_capacity(cfg.server.max_connections, cfg.ws.max_clients)
    listener = await open_listener(cfg.server.bind, reuse_port=cfg.server.reuse_port)
    url = bound_url(listener)
    listeners = [listener]
    internal_url = ""
    if cfg.server.internal_bind:  # the operator's port: same front door, only it serves /stats, /metrics, /status
        internal = await open_listener(cfg.server.internal_bind, reuse_port=cfg.server.reuse_port)
        listeners.append(internal)
        internal_url = bound_url(internal)
    async with trio.open_nursery() as services_nursery:
        if demo:
            cfg = await _start_demo(cfg, services_nursery)
        services = build_services(cfg)
        if len(listeners) > 1:
            host, port = listeners[1].socket.getsockname()[:2]
            services.internal_address = (str(host), int(port))
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
        if services.pool is not None and cfg.rpc.enabled:  # /rpc (issue 12)
            services.rpc_proxy = RpcService(cfg, services.pool, services.cache, services.limiter)
            services.extra_stats["rpc"] = services.rpc_proxy.stats
            await services_nursery.start(services.rpc_proxy.run)
        views = Views(services)
        services.extra_stats["api"] = views.stats.stats
        bridge = HypercornBridge(create_app(services, views), cfg.server, send_timeout=cfg.ws.send_timeout)
        door = FrontDoor(cfg, services, views, bridge, capacity)
        services.extra_stats["connections"] = door.stats
        if services.rpc_proxy is not None:
            door.upgrades["/rpc"] = services.rpc_proxy.accept_ws  # GET /rpc: Solana PubSub (rpc/session.py)
        await services_nursery.start(bridge.run)
        services_nursery.start_soon(_watch_signals, stop)
        _log_startup(cfg, url, demo, internal_url)

        async with trio.open_nursery() as connections:
            with trio.CancelScope() as accepting:
                services_nursery.start_soon(_stop_when, stop, accepting)
                task_status.started((url, services))
                async with trio.open_nursery() as acceptors:  # the public port, and the internal one if set
                    for each in listeners:
                        acceptors.start_soon(accept_forever, each, door.handle, connections)
            # Shutdown: no new connections; WebSocket clients get 1001 at once.
            log.info("shutting down: closing %d WebSocket clients, draining HTTP (up to %gs)",
                     len(services.hub), cfg.server.graceful_timeout)
            services.hub.close_all(wsframes.CLOSE_GOING_AWAY, "server shutting down")
            door.stop()
            await bridge.drain()
            connections.cancel_scope.deadline = trio.current_time() + cfg.server.graceful_timeout
        bridge.stop()
        services_nursery.cancel_scope.cancel(reason="server stopped")
    log.info("stopped")


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
    # Its Hypercorn would announce "Running on <simulator>": people would take it for the server.
    logging.getLogger("edgestate.sim.hypercorn").setLevel(logging.WARNING)
    sim_url = await nursery.start(serve_simulator, world, "127.0.0.1:0")
    nursery.start_soon(run_demo_drift, world)
    log.info("demo mode: simulated upstream at %s (no network, no keys)", sim_url)
    cfg = cfg.replace("upstream", rpc_url=[sim_url], ws_url="ws" + sim_url[4:])
    return cfg.replace("price", url=sim_url + "/price/v3")


def _log_startup(cfg: Config, url: str, demo: bool, internal_url: str = "") -> None:
    up, st = cfg.upstream, cfg.state
    log.info("edgestate %s listening on %s (HTTP + WebSocket /ws)%s", __version__, url, " [demo]" if demo else "")
    if internal_url:
        log.info("internal listener on %s: /stats, /metrics and /status are served only there", internal_url)
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
