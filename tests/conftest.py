"""Shared fixtures: the simulated upstream and a full server on ephemeral ports."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from edgestate import config
from edgestate.server import serve
from edgestate.services import Services
from edgestate.sim import World, serve_simulator


def make_config(sim_url: str | None = None, **sections: dict[str, Any]) -> config.Config:
    """A config pointing at ``sim_url``, bound to an ephemeral port, plus overrides."""
    raw: dict[str, dict[str, Any]] = {"server": {"bind": "127.0.0.1:0", "graceful_timeout": 2.0}}
    if sim_url:
        raw["upstream"] = {"rpc_url": [sim_url], "ws_url": "ws" + sim_url[4:]}
        raw["price"] = {"url": sim_url + "/price/v3", "max_requests_per_second": 50.0}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw, source="test", environ={})


class Sim:
    def __init__(self, world: World, url: str) -> None:
        self.world, self.url = world, url


@pytest.fixture
async def sim(nursery: trio.Nursery) -> Sim:
    world = World.from_config(make_config())
    url = await nursery.start(serve_simulator, world, "127.0.0.1:0")
    return Sim(world, url)


class Running:
    def __init__(self, url: str, services: Services, stop: trio.Event, done: trio.Event) -> None:
        self.url, self.services, self.stop, self.done = url, services, stop, done

    async def shutdown(self) -> None:
        self.stop.set()
        await self.done.wait()


async def start_server(nursery: trio.Nursery, cfg: config.Config) -> Running:
    stop, done = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[tuple[str, Services]]) -> None:
        try:
            await serve(cfg, stop=stop, task_status=task_status)
        finally:
            done.set()

    url, services = await nursery.start(run)
    return Running(url, services, stop, done)


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(interval)


@pytest.fixture
async def ws_connect():
    """Connect raw WebSocket clients that are closed at teardown."""
    from tests.wsclient import WsClient

    clients: list[WsClient] = []

    async def connect(url: str, **kwargs: Any) -> WsClient:
        client = await WsClient.connect(url, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.aclose()
