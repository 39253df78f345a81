"""The hub on real sockets, without HTTP: conflation, slow clients, fan-out."""

from __future__ import annotations

import socket

import trio

from edgestate import wsframes
from edgestate.broadcast import Client, Hub
from edgestate.state import SharedState
from tests.conftest import make_config


def small_socketpair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def drain(sock: trio.socket.SocketType) -> bytes:
    out = bytearray()
    while True:
        try:
            with trio.move_on_after(0.05) as scope:
                data = await sock.recv(65536)
            if scope.cancelled_caught or not data:
                return bytes(out)
            out += data
        except OSError:
            return bytes(out)


async def test_slow_client_is_conflated_then_closed_and_others_unaffected(autojump_clock):
    cfg = make_config(ws={"send_timeout": 3.0})
    state = SharedState(cfg)
    hub = Hub(cfg.ws, state)
    slow_server, slow_peer = small_socketpair()
    fast_server, fast_peer = small_socketpair()
    with slow_server, slow_peer, fast_server, fast_peer:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            slow = Client(hub, slow_server, "slow")
            fast = Client(hub, fast_server, "fast")
            hub.add(slow)
            hub.add(fast)
            # Frames far bigger than the socket buffers: the slow peer never reads.
            payload = b"x" * 200_000
            for i in range(5):
                frame = wsframes.text_frame(payload + str(i).encode())
                slow.send_state(frame)
                fast.send_state(frame)
                assert len(await drain(fast_peer)) > 0 or fast.pending is None
            # The slow client holds one partial frame and one latest frame, not a backlog.
            assert slow.pending is not None
            assert slow.latest is not None and slow.latest.endswith(b"4")
            assert hub.conflated >= 3
            t0 = trio.current_time()
            await trio.sleep(3.5)
            assert slow.closing and slow not in hub._clients
            assert hub.slow_closed == 1
            assert trio.current_time() - t0 < 4
            # The fast client is still registered and served.
            assert fast in hub._clients and not fast.closing
            nursery.cancel_scope.cancel()


async def test_fan_out_encodes_once_and_reaches_all(autojump_clock):
    cfg = make_config()
    state = SharedState(cfg)
    hub = Hub(cfg.ws, state)
    pairs = [small_socketpair() for _ in range(50)]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            clients = [Client(hub, server, f"c{i}") for i, (server, _) in enumerate(pairs)]
            for c in clients:
                hub.add(c)
            for _, peer in pairs:
                await drain(peer)  # the initial state
            state.update("jackpot", 5_000_000_000, slot=10)
            await trio.testing.wait_all_tasks_blocked()
            expected = hub.current_frame
            assert b'"jackpot":5.0' in expected
            for _, peer in pairs:
                assert await drain(peer) == expected
            assert hub.stats()["updates"] == 1
            nursery.cancel_scope.cancel()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_back_to_back_changes_each_reach_every_client_in_order(autojump_clock):
    cfg = make_config()
    state = SharedState(cfg)
    hub = Hub(cfg.ws, state)
    pairs = [small_socketpair() for _ in range(5)]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            for i, (server, _) in enumerate(pairs):
                hub.add(Client(hub, server, f"c{i}"))
            for _, peer in pairs:
                await drain(peer)
            # Three changes before the hub task runs: none may be skipped.
            for lamports in (1, 2, 3):
                state.update("jackpot", lamports * 1_000_000_000, slot=lamports)
            late = small_socketpair()
            pairs.append(late)
            hub.add(Client(hub, late[0], "late"))  # joins with the newest state only
            await trio.testing.wait_all_tasks_blocked()
            for _, peer in pairs[:-1]:
                got = await drain(peer)
                assert [got.count(f'"jackpot":{v}.0'.encode()) for v in (1, 2, 3)] == [1, 1, 1]
                assert got.index(b'"jackpot":1.0') < got.index(b'"jackpot":2.0') < got.index(b'"jackpot":3.0')
            late_got = await drain(late[1])
            assert b'"jackpot":3.0' in late_got and b'"jackpot":1.0' not in late_got
            assert late_got.count(b"stateUpdate") == 1  # not an older state after the newest
            nursery.cancel_scope.cancel()
    finally:
        for a, b in pairs:
            a.close()
            b.close()
