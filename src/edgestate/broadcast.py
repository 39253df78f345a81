"""Latest-value fan-out of the state to every WebSocket client.

Why it looks like this (measurements in ../shared/STACK-NOTES.md): waking one task per
client and sending through the framework costs ~200 µs per client; one synchronous loop
of non-blocking writes of a frame encoded once costs ~10 µs. So a broadcast is a plain
loop of ``os.write`` calls on the clients' sockets. A socket that cannot take the whole
frame keeps the rest as ``pending`` and is handed to a flush task of its own; until it
drains, newer states replace each other in its one ``latest`` slot (conflation), so a
slow client never builds a backlog. A client that takes nothing for ``ws.send_timeout``
is closed.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any

import trio

from . import wsframes
from .config import WsConfig
from .state import SharedState, Snapshot
from .telemetry import Telemetry

log = logging.getLogger("edgestate.broadcast")

# Yield to other tasks every this many clients during a fan-out.
_CHUNK = 2048
# Replies (pong, errors) a client may have queued while its socket is full.
_MAX_QUEUED_REPLIES = 16
# State frames waiting for their fan-out (see Hub._outbox).
_MAX_OUTBOX = 64


def state_frame(snapshot: Snapshot) -> bytes:
    """The ``stateUpdate`` WebSocket frame of a snapshot (its body embedded as is)."""
    return wsframes.text_frame(b'{"type":"stateUpdate","state":' + snapshot.body + b"}")


class Client:
    """One WebSocket client as the hub sees it: a socket and its send slots."""

    __slots__ = (
        "fd",
        "sock",
        "peer",
        "pending",
        "latest",
        "replies",
        "flushing",
        "closing",
        "last_seen",
        "cancel_scope",
        "hub",
        "unread",
        "seen",
    )

    def __init__(self, hub: Hub, sock: trio.socket.SocketType, peer: str) -> None:
        self.hub = hub
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending: memoryview | None = None  # rest of a frame the socket did not take
        self.latest: bytes | None = None  # newest state frame waiting behind ``pending``
        self.replies: collections.deque[bytes] | None = None  # created only when needed
        self.flushing = False
        self.closing = False
        self.last_seen = trio.current_time()
        self.cancel_scope = trio.CancelScope()
        self.unread = b""  # bytes read with the handshake that belong to the first frames
        self.seen = 0  # publication sequence number of the newest state sent to this client

    def send_state(self, frame: bytes) -> None:
        """Offer a state frame; conflated with any state frame still waiting."""
        if self.closing:
            return
        if self.pending is not None:
            if self.latest is not None:
                self.hub.conflated += 1
            self.latest = frame
            return
        self._write(frame)

    def send_reply(self, frame: bytes) -> None:
        """Send a reply or control frame; queued (bounded) behind a full socket."""
        if self.closing:
            return
        if self.pending is None:
            self._write(frame)
            return
        if self.replies is None:
            self.replies = collections.deque()
        if len(self.replies) >= _MAX_QUEUED_REPLIES:
            self.close(wsframes.CLOSE_POLICY_VIOLATION, "not reading replies")
            return
        self.replies.append(frame)

    def _write(self, frame: bytes | memoryview) -> None:
        try:
            sent = os.write(self.fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # peer gone (EPIPE, ECONNRESET): its task will notice too
            self.close(None)
            return
        if sent == len(frame):
            self.hub.frames_sent += 1
            return
        self.pending = memoryview(frame)[sent:]
        if not self.flushing:
            self.flushing = True
            self.hub.spawn_flush(self)

    def _next_frame(self) -> bytes | None:
        if self.replies:
            return self.replies.popleft()
        frame, self.latest = self.latest, None
        return frame

    async def flush(self, send_timeout: float) -> None:
        """Drain ``pending`` then whatever queued behind it; close if stuck."""
        try:
            while self.pending is not None and not self.closing:
                with trio.move_on_after(send_timeout) as waited:
                    await trio.lowlevel.wait_writable(self.sock)
                if waited.cancelled_caught:
                    self.hub.slow_closed += 1
                    log.info("closing slow WebSocket client %s: no progress in %.1fs", self.peer, send_timeout)
                    self.close(None)
                    return
                if self.closing:
                    return
                pending, self.pending = self.pending, None
                self._write(pending)
                if self.pending is None:
                    frame = self._next_frame()
                    if frame is not None:
                        self._write(frame)
        except (trio.ClosedResourceError, OSError):
            self.close(None)
        finally:
            self.flushing = False

    def close(self, code: int | None, reason: str = "") -> None:
        """Stop sending; send a close frame with ``code`` if the socket is between frames.

        The connection's own task notices (its cancel scope) and releases the socket.
        """
        if self.closing:
            return
        if code is not None and self.pending is None:
            try:
                os.write(self.fd, wsframes.close_frame(code, reason))
            except OSError:
                pass
        self.closing = True
        self.hub.discard(self)
        self.cancel_scope.cancel()


class Hub:
    """The set of WebSocket clients and the fan-out of each new snapshot."""

    def __init__(self, cfg: WsConfig, state: SharedState) -> None:
        self._cfg = cfg
        self._state = state
        self._clients: dict[Client, None] = {}  # insertion-ordered set
        self._nursery: trio.Nursery | None = None
        self._frame = state_frame(state.snapshot)
        # Frames published but not yet fanned out, oldest first: every change reaches every
        # client that keeps up, even when two arrive back to back. Bounded: past it (a
        # fan-out far slower than the update rate) the oldest are dropped, i.e. conflated.
        self._outbox: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=_MAX_OUTBOX)
        self._seq = 0  # publications so far; orders what each client has seen
        self._new_version = trio.Event()
        self.peak = 0
        self.connected_total = 0
        self.refused_full = 0
        self.refused_handshake = 0  # upgrade requests answered 4xx (bad, wrong origin)
        self.conflated = 0
        self.slow_closed = 0
        self.dead_closed = 0
        self.frames_sent = 0
        self.broadcasts = 0
        self.last_cpu_s = 0.0
        self._durations: collections.deque[float] = collections.deque(maxlen=256)
        self.telemetry = Telemetry()  # services.py hands in the process's own (/metrics)
        self._unsubscribe = state.subscribe(self._on_snapshot)

    @property
    def current_frame(self) -> bytes:
        """The frame of the newest snapshot (what a newcomer or ``getState`` gets)."""
        return self._frame

    def __len__(self) -> int:
        return len(self._clients)

    def is_full(self) -> bool:
        return len(self._clients) >= self._cfg.max_clients

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # Encode once per update, not once per client.
        self._frame = state_frame(snapshot)
        self._seq += 1
        if len(self._outbox) == self._outbox.maxlen:
            self.conflated += len(self._clients)
        self._outbox.append((self._seq, self._frame))
        self._new_version.set()

    def add(self, client: Client) -> None:
        """Register a client and send it the current state at once."""
        self._clients[client] = None
        self.connected_total += 1
        self.peak = max(self.peak, len(self._clients))
        self.send_current(client)

    def send_current(self, client: Client) -> None:
        """Send the newest state now; older ones still waiting for fan-out skip this client."""
        client.seen = self._seq
        client.send_state(self._frame)

    def discard(self, client: Client) -> None:
        self._clients.pop(client, None)

    def spawn_flush(self, client: Client) -> None:
        if self._nursery is None:  # not running (tests driving the hub by hand)
            client.flushing = False
            return
        self._nursery.start_soon(client.flush, self._cfg.send_timeout)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fan out each new snapshot and keep the heartbeat; runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeat)
                task_status.started()
                while True:
                    await self._new_version.wait()
                    self._new_version = trio.Event()
                    while self._outbox:
                        await self._fan_out(*self._outbox.popleft())
        finally:
            self._nursery = None
            self._unsubscribe()

    async def _fan_out(self, seq: int, frame: bytes) -> None:
        started, cpu0 = trio.current_time(), time.process_time()
        clients = list(self._clients)
        for i in range(0, len(clients), _CHUNK):
            for client in clients[i : i + _CHUNK]:
                if client.seen < seq:  # never send a client an older state than it has
                    client.seen = seq
                    client.send_state(frame)
            # Let other tasks (HTTP, reads) run between chunks of a large fan-out.
            await trio.lowlevel.checkpoint()
        self.broadcasts += 1
        self._durations.append(trio.current_time() - started)
        self.telemetry.broadcast_duration.observe(self._durations[-1])
        self.last_cpu_s = time.process_time() - cpu0

    async def _heartbeat(self) -> None:
        interval = self._cfg.ping_interval
        while True:
            await trio.sleep(interval)
            deadline = trio.current_time() - 2 * interval
            for client in list(self._clients):
                if client.last_seen < deadline:
                    self.dead_closed += 1
                    client.close(wsframes.CLOSE_GOING_AWAY, "no answer to ping")
                else:
                    client.send_reply(wsframes.PING_FRAME)

    def close_all(self, code: int, reason: str = "") -> None:
        """Close every client with ``code`` (1001 at shutdown)."""
        for client in list(self._clients):
            client.close(code, reason)

    def stats(self) -> dict[str, Any]:
        durations = sorted(self._durations)
        return {
            "subscribers": len(self._clients),
            "peak": self.peak,
            "max_clients": self._cfg.max_clients,
            "connected_total": self.connected_total,
            "refused_full": self.refused_full,
            "refused_handshake": self.refused_handshake,
            "updates": self.broadcasts,
            "frames_sent": self.frames_sent,
            "conflated": self.conflated,
            "slow_clients_closed": self.slow_closed,
            "dead_clients_closed": self.dead_closed,
            "last_broadcast_ms": round(self._durations[-1] * 1000, 3) if durations else 0.0,
            "p99_broadcast_ms": round(durations[int(0.99 * (len(durations) - 1))] * 1000, 3) if durations else 0.0,
            "last_broadcast_cpu_ms": round(self.last_cpu_s * 1000, 3),
        }
