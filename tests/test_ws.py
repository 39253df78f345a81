"""/ws end to end: a real server, the simulated upstream, raw WebSocket clients."""

from __future__ import annotations

import trio

from edgestate import wsframes
from tests.conftest import make_config, start_server, wait_for
from tests.wsclient import WsClient, masked

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}


async def ready_server(nursery, sim, **sections):
    sections.setdefault("state", FAR)
    server = await start_server(nursery, make_config(sim.url, **sections))
    await wait_for(lambda: server.services.state.ready()[0] and server.services.refresher.pubsub.up)
    return server


async def test_push_reaches_client_without_polling(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim)
        client = await ws_connect(server.url)
        first = await client.message()
        assert first["type"] == "stateUpdate"
        assert first["state"]["jackpot"] == sim.world.jackpot / 1e9
        polls_before = server.services.refresher.polls["jackpot"]
        sim.world.set_jackpot(77_000_000_000)
        update = await client.message()
        assert update["state"]["jackpot"] == 77.0
        assert server.services.refresher.polls["jackpot"] == polls_before  # pushed, not polled
        await server.shutdown()


async def test_polling_fallback_then_push_resumes(nursery, sim, ws_connect):
    with trio.fail_after(15):
        server = await ready_server(nursery, sim, state={**FAR, "polling_interval": 0.3})
        client = await ws_connect(server.url)
        await client.message()
        sim.world.set_faults(refuse_ws=True)
        sim.world.drop_ws()
        await wait_for(lambda: not server.services.refresher.pubsub.up)
        sim.world.set_jackpot(55_000_000_000)
        assert (await client.message())["state"]["jackpot"] == 55.0  # by polling
        sim.world.set_faults(refuse_ws=False)
        await wait_for(lambda: server.services.refresher.pubsub.up, timeout=10)
        polls = server.services.refresher.polls["jackpot"]
        sim.world.set_jackpot(56_000_000_000)
        assert (await client.message())["state"]["jackpot"] == 56.0
        # Push is back: polling stopped (at most the one read done on resubscribe).
        await trio.sleep(0.7)
        assert server.services.refresher.polls["jackpot"] <= polls + 1
        await server.shutdown()


async def test_200_clients_get_every_update_in_order_once(nursery, sim, ws_connect):
    with trio.fail_after(20):
        server = await ready_server(nursery, sim)
        clients = [await ws_connect(server.url) for _ in range(200)]
        for c in clients:
            assert (await c.message())["type"] == "stateUpdate"
        received: list[list[float]] = [[] for _ in clients]
        values = [float(v) for v in range(1, 6)]

        async def reader(i: int, c: WsClient) -> None:
            while len(received[i]) < len(values):
                received[i].append((await c.message())["state"]["jackpot"])

        async with trio.open_nursery() as readers:
            for i, c in enumerate(clients):
                readers.start_soon(reader, i, c)
            for v in values:
                sim.world.set_jackpot(int(v * 1e9))
                # Wait until every client saw it: then the next one is a distinct update.
                await wait_for(lambda v=v: all(len(r) >= values.index(v) + 1 for r in received))
        assert all(r == values for r in received)
        # An unchanged poll sends nothing: the same value again publishes nothing.
        sent = server.services.hub.frames_sent
        version = server.services.state.snapshot.version
        server.services.state.update("jackpot", 5_000_000_000, slot=server.services.state.field("jackpot").slot)
        assert server.services.state.snapshot.version == version
        assert server.services.hub.frames_sent == sent
        await server.shutdown()


async def test_get_state_ping_and_bad_frames(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim, ws={"max_message_size": 64})
        client = await ws_connect(server.url)
        await client.message()
        await client.send_json({"type": "getState"})
        assert (await client.message())["type"] == "stateUpdate"
        await client.send_json({"type": "ping"})
        assert await client.message() == {"type": "pong"}
        cases = [
            masked(wsframes.OP_TEXT, b"{not json"),
            masked(wsframes.OP_TEXT, b'{"type": "dance"}'),
            masked(wsframes.OP_TEXT, b"[1, 2]"),
            masked(wsframes.OP_BINARY, b"\x00\x01"),
            masked(wsframes.OP_TEXT, b"x" * 65),
        ]
        for frame in cases:
            await client.send_raw(frame)
            reply = await client.message()
            assert reply["type"] == "error" and reply["error"]
        await client.send_json({"type": "ping"})  # still usable
        assert await client.message() == {"type": "pong"}
        for _ in range(10):
            await client.send_raw(masked(wsframes.OP_TEXT, b"{bad"))
        assert await client.close_code() == 1008
        await server.shutdown()


async def test_protocol_error_closes_1002_and_plain_get_is_426(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim)
        client = await ws_connect(server.url)
        await client.message()
        await client.send_raw(b"\x81\x02hi")  # unmasked client frame
        assert await client.close_code() == 1002
        host, port = server.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        plain = WsClient(stream)
        status, headers = await plain.read_head()
        assert status == 426
        assert b'"upgrade_required"' in await plain.read_body(int(headers["content-length"]))
        await plain.aclose()
        await server.shutdown()


async def test_origin_allowlist_and_max_clients(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(
            nursery, sim, server={"allowed_origins": ["https://app.example"]}, ws={"max_clients": 2}
        )
        denied = await ws_connect(server.url, origin="https://evil.example")
        assert denied.status == 403
        a = await ws_connect(server.url, origin="https://app.example")
        b = await ws_connect(server.url)
        assert a.status == b.status == 101
        c = await ws_connect(server.url, origin="https://app.example")
        assert c.status == 101
        assert await c.close_code() == 1013
        assert server.services.hub.stats()["refused_full"] == 1
        await server.shutdown()


async def test_shutdown_closes_clients_with_1001(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim)
        clients = [await ws_connect(server.url) for _ in range(5)]
        for c in clients:
            await c.message()
        server.stop.set()
        for c in clients:
            assert await c.close_code() == 1001
        await server.done.wait()


async def test_dead_peer_dropped_by_heartbeat(nursery, sim, ws_connect):
    with trio.fail_after(10):
        server = await ready_server(nursery, sim, ws={"ping_interval": 0.2})
        alive = await ws_connect(server.url)
        dead = await ws_connect(server.url)
        await dead.message()

        async def keep_answering() -> None:
            try:
                while True:
                    await alive.message()  # answers pings
            except ConnectionError:  # our shutdown's 1001 at the end
                pass

        nursery.start_soon(keep_answering)
        # The dead one never answers pings: dropped after two intervals.
        assert await dead.close_code() == 1001
        assert len(server.services.hub) == 1
        assert server.services.hub.stats()["dead_clients_closed"] == 1
        await server.shutdown()
