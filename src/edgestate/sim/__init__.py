"""A simulated upstream: Solana JSON-RPC + PubSub and the Jupiter Price API v3.

Used by the tests, the benchmarks (which read its request counters) and
``edgestate serve --demo`` / ``edgestate simulate``::

    world = World.from_config(cfg)
    url = await nursery.start(serve_simulator, world)       # "http://127.0.0.1:43817"
    # RPC: url + "/", PubSub: "ws" + url[4:] + "/", prices: url + "/price/v3"
"""

from __future__ import annotations

import logging
import math
import random
import socket

import hypercorn.config
import hypercorn.trio
import trio

from .app import create_sim_app
from .world import LAMPORTS_PER_SOL, World, run_slot_ticker

__all__ = ["World", "create_sim_app", "run_demo_drift", "run_slot_ticker", "serve_simulator"]


async def serve_simulator(
    world: World,
    bind: str = "127.0.0.1:0",
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``world`` over HTTP and WebSocket until cancelled.

    Args:
        world: the simulated chain to serve.
        bind: HOST:PORT; port 0 picks a free one.
        task_status: receives the bound base URL, e.g. ``"http://127.0.0.1:43817"``.

    Raises:
        OSError: the address cannot be bound (a plain OSError, not a group).
        ValueError: ``bind`` is not HOST:PORT.
    """
    config = hypercorn.config.Config()
    # Bind here, not in Hypercorn, so a busy port raises a plain OSError from this
    # frame instead of one nested in Hypercorn's exception groups; Hypercorn then
    # owns the descriptor (fd://) and closes it.
    config.bind = [f"fd://{_bind_socket(bind).detach()}"]
    config.accesslog = None
    # Hypercorn's "-" default would rewire the global "hypercorn.error" logger to stderr.
    config.errorlog = logging.getLogger("edgestate.sim.hypercorn")
    config.graceful_timeout = 0.5
    config.backlog = 1024  # benchmarks open many upstream connections at once
    app = create_sim_app(world)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, app, config)
        task_status.started(binds[0])


def _bind_socket(bind: str) -> socket.socket:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bind must be HOST:PORT, got {bind!r}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
    except BaseException:
        sock.close()
        raise
    return sock


async def run_demo_drift(world: World, *, interval: float = 1.0, rng: random.Random | None = None) -> None:
    """Keep the demo alive forever: the price walks, players join, the pot grows.

    Every ``interval`` seconds the token price takes a bounded random step (always
    positive, within 0.1x..10x of where it started), the slot advances and, now and
    then, a participant joins and adds 0.1 SOL to the jackpot.

    Args:
        world: the world to mutate (its token_mint must have a price).
        interval: seconds between steps.
        rng: random source (default: a fresh unseeded one, so demos differ).
    """
    rng = rng or random.Random()
    start = world.prices.get(world.token_mint, 0.042)
    while True:
        await trio.sleep(interval)
        price = world.prices.get(world.token_mint, start)
        step = math.exp(rng.gauss(0.0, 0.01))
        world.set_price(world.token_mint, min(start * 10, max(start / 10, price * step)))
        if rng.random() < 0.3:
            world.add_participants(1)
            world.add_jackpot(LAMPORTS_PER_SOL // 10)
        world.advance_slot()
