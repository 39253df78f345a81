"""``edgestate serve --workers N`` as a real process group (issue 7)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import trio

from edgestate import config
from edgestate.listen import open_listener

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


def write_config(tmp_path, sim_url: str, bind: str = "127.0.0.1:0") -> str:
    path = tmp_path / "edgestate.toml"
    path.write_text(
        f'[server]\nbind = "{bind}"\ngraceful_timeout = 1.0\n'
        f'[upstream]\nrpc_url = "{sim_url}"\nws_url = "ws{sim_url[4:]}"\n'
        f'[price]\nurl = "{sim_url}/price/v3"\nmax_requests_per_second = 50.0\n'
        "[state]\n" + "".join(f"{k} = {v}\n" for k, v in FAR.items())
    )
    return str(path)


class Group:
    """The supervisor process, with its stderr collected (all members share it)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.log = ""

    async def drain(self) -> None:
        assert self.proc.stderr is not None
        async for chunk in self.proc.stderr:
            self.log += chunk.decode(errors="replace")

    async def url(self) -> str:
        pattern = re.compile(r"edgestate workers: \d+ on (http://\S+),")
        with trio.fail_after(15):
            while not (match := pattern.search(self.log)):
                if self.proc.poll() is not None:
                    raise AssertionError(f"supervisor exited {self.proc.returncode}:\n{self.log}")
                await trio.sleep(0.05)
        return match.group(1)


async def start_group(nursery, *args: str) -> Group:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "edgestate", "serve", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    group = Group(proc)
    nursery.start_soon(group.drain)
    return group


async def members(api: httpx.AsyncClient) -> dict[str, dict]:
    try:
        doc = (await api.get("/stats")).json()
    except httpx.TransportError:  # a connection to the worker just killed
        return {}
    return {m["id"]: m for m in doc["workers"]["each"]}


async def test_workers_share_the_port_all_get_updates_and_a_killed_worker_comes_back(
    nursery, sim, ws_connect, tmp_path
):
    group = await start_group(nursery, "--workers", "2", "--config", write_config(tmp_path, sim.url))
    try:
        with trio.fail_after(25):
            url = await group.url()
            clients = [await ws_connect(url) for _ in range(12)]
            for client in clients:
                assert (await client.message())["type"] == "stateUpdate"
            # A new connection per request: each may land on any worker.
            no_reuse = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=5, limits=no_reuse) as api:
                # Both workers hold some of the clients (the kernel spreads them).
                with trio.fail_after(5):
                    while True:
                        each = await members(api)
                        if {"0", "1", "feed"} <= set(each) and all(
                            each[w]["websocket_clients"] > 0 for w in ("0", "1")
                        ) and sum(each[w]["websocket_clients"] for w in ("0", "1")) == 12:
                            break
                        await trio.sleep(0.2)
                doc = (await api.get("/stats")).json()
                assert doc["server"]["worker"]["role"] == "worker" and doc["feed"]["connected"] is True
                assert doc["workers"]["workers"] == 2 and doc["workers"]["total"]["websocket_clients"] == 12
                everyone = (await api.get("/stats", params={"scope": "all"})).json()
                assert everyone["scope"] == "all" and {"0", "1", "feed"} <= set(everyone["members"])

                # One upstream change reaches every client of every worker.
                sim.world.set_jackpot(42_000_000_000)
                for client in clients:
                    state = (await client.message())["state"]
                    assert state["jackpot"] == 42.0

                # Kill worker 0: it is restarted, and new connections work again.
                victim = each["0"]["pid"]
                os.kill(victim, signal.SIGKILL)
                with trio.fail_after(10):
                    while True:
                        each = await members(api)
                        if each.get("0", {}).get("pid") not in (None, victim):
                            break
                        await trio.sleep(0.2)
                assert "restarting" in group.log
                fresh = [await ws_connect(url) for _ in range(4)]
                for client in fresh:
                    await client.message()
                sim.world.set_jackpot(43_000_000_000)
                for client in fresh:
                    assert (await client.message())["state"]["jackpot"] == 43.0

            # SIGTERM drains every member and exits 0.
            group.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(8):
                assert await group.proc.wait() == 0
            assert "Traceback" not in group.log
    finally:
        if group.proc.returncode is None:
            group.proc.kill()
            await group.proc.wait()


async def test_busy_port_fails_fast_with_exit_1(nursery, sim, tmp_path):
    cfg = config.from_dict({"server": {"bind": "127.0.0.1:0"}}, environ={})
    listener = await open_listener(cfg.server.bind)
    port = listener.socket.getsockname()[1]
    try:
        path = write_config(tmp_path, sim.url, bind=f"127.0.0.1:{port}")
        group = await start_group(nursery, "--workers", "2", "--config", path)
        with trio.fail_after(10):
            assert await group.proc.wait() == 1
        await trio.sleep(0.1)
        assert "address already in use" in group.log
    finally:
        await listener.aclose()


async def test_internal_bind_in_a_group_serves_metrics_with_worker_labels(nursery, sim, tmp_path):
    import socket

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        internal = s.getsockname()[1]
    path = write_config(tmp_path, sim.url)
    text = (tmp_path / "edgestate.toml").read_text()
    (tmp_path / "edgestate.toml").write_text(
        text.replace("[server]\n", f'[server]\ninternal_bind = "127.0.0.1:{internal}"\n', 1))
    group = await start_group(nursery, "--workers", "2", "--config", path)
    try:
        url = await group.url()
        async with httpx.AsyncClient() as client:
            with trio.fail_after(10):
                assert (await client.get(url + "/metrics")).status_code == 404
                seen = set()
                for _ in range(20):  # SO_REUSEPORT spreads scrapes over the members
                    metrics = (await client.get(f"http://127.0.0.1:{internal}/metrics",
                                                headers={"connection": "close"})).text
                    for fam in text_string_to_metric_families(metrics):
                        for sample in fam.samples:
                            assert "worker" in sample.labels, sample
                            seen.add(sample.labels["worker"])
        assert seen and seen <= {"feed", "0", "1"}
    finally:
        group.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await group.proc.wait()
    assert group.proc.returncode == 0, group.log
