"""GET /rpc WebSocket: the Solana PubSub protocol for one client connection.

The front door hands over ``GET /rpc`` upgrades (its ``upgrades`` table). The handshake
checks are /ws's (:func:`edgestate.ws.check_upgrade`: same headers, same Origin allowlist); frames are
parsed by :class:`edgestate.wsframes.FrameParser`. Subscriptions go to the shared
:class:`~edgestate.rpc.mux.Mux`.

Writes never wait: :class:`RpcConn` writes each frame with a non-blocking ``os.write``
(the same bytes for every subscriber of a notification); what the socket does not take
waits in a queue bounded in bytes that this connection's own task drains. A client whose
queue overflows, or that takes nothing for ``ws.send_timeout``, is closed: notifications
are a stream, so unlike /ws's latest-state slot they cannot be conflated.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Coroutine
from typing import Any

import trio

from .. import wsframes
from ..config import Config
from ..errors import BadRequest
from ..heads import Request
from ..listen import peer_of
from ..views import HttpDate, error_response
from ..ws import MAX_FRAGMENTS, check_upgrade, receive
from . import policy
from .mux import Mux, Sub, error_frame, reply_frame

log = logging.getLogger("edgestate.rpc.ws")
access_log = logging.getLogger("edgestate.access")

_MAX_QUEUED_BYTES = 4 << 20  # per connection, behind a full socket
_MAX_STRIKES = 10
_TOO_MANY = -32000  # agave's server-error range: a limit of this server
_HANDSHAKE_SEND_TIMEOUT = 10.0
_DATE = HttpDate()


class RpcConn:
    """One /rpc WebSocket client: non-blocking writes, a bounded queue, its subscriptions."""

    __slots__ = ("fd", "sock", "peer", "pending", "queue", "queued", "closing", "wake", "last_seen", "scope",
                 "subs", "strikes", "allowance", "stamp", "frames", "charged")

    def __init__(self, sock: trio.socket.SocketType, peer: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pending: memoryview | None = None  # rest of a frame the socket did not take
        self.queue: collections.deque[bytes] = collections.deque()  # frames behind ``pending``
        self.queued = 0
        self.closing = False
        self.wake = trio.Event()
        self.last_seen = trio.current_time()
        self.scope = trio.CancelScope()
        self.subs: dict[Sub, None] = {}
        self.strikes = 0
        self.allowance = 0.0
        self.stamp = trio.current_time()
        self.frames = 0  # frames sent
        self.charged = 0  # frames received and already paid for out of the rate allowance

    def send_frame(self, frame: bytes) -> None:
        """Write ``frame`` now if the socket takes it, else queue it (bounded)."""
        if self.closing:
            return
        if self.pending is None:
            self._write(frame)
            return
        if self.queued + len(frame) > _MAX_QUEUED_BYTES:
            self.close(wsframes.CLOSE_POLICY_VIOLATION, "not reading notifications")
            return
        self.queue.append(frame)
        self.queued += len(frame)

    def _write(self, frame: bytes | memoryview) -> None:
        try:
            sent = os.write(self.fd, frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # the peer is gone; the receive side notices too
            self.close(None)
            return
        if sent == len(frame):
            self.frames += 1
            return
        self.pending = memoryview(frame)[sent:]
        self.wake.set()

    async def flush(self, send_timeout: float) -> None:
        """Drain what the socket did not take; close the client if it stalls."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            while self.pending is not None and not self.closing:
                with trio.move_on_after(send_timeout) as waited:
                    await trio.lowlevel.wait_writable(self.sock)
                if waited.cancelled_caught:
                    log.info("closing slow /rpc client %s: no progress in %.1fs", self.peer, send_timeout)
                    self.close(None)
                    return
                pending, self.pending = self.pending, None
                self._write(pending)
                while self.pending is None and self.queue and not self.closing:
                    frame = self.queue.popleft()
                    self.queued -= len(frame)
                    self._write(frame)

    def close(self, code: int | None, reason: str = "") -> None:
        """Stop writing (a close frame first when between frames); ends the session."""
        if self.closing:
            return
        if code is not None and self.pending is None:
            try:
                os.write(self.fd, wsframes.close_frame(code, reason))
            except OSError:
                pass
        self.closing = True
        self.queue.clear()
        self.scope.cancel()

    def subscriptions(self) -> int:
        """How many subscriptions this client holds (dead ones pruned)."""
        for sub in [s for s in self.subs if not s.alive or self not in s.conns]:
            del self.subs[sub]
        return sum(s.conns.get(self, 0) for s in self.subs)


class RpcSockets:
    """The /rpc WebSocket clients of this process: limits, stats, shutdown."""

    def __init__(self, cfg: Config, mux: Mux) -> None:
        self.cfg = cfg
        self.mux = mux
        self.conns: dict[RpcConn, None] = {}
        self.connected_total = 0
        self.refused_full = 0
        self.closed_abuse = 0

    def close_all(self, code: int, reason: str = "") -> None:
        for conn in list(self.conns):
            conn.close(code, reason)

    def stats(self) -> dict[str, Any]:
        return {
            "clients": len(self.conns),
            "connected_total": self.connected_total,
            "refused_full": self.refused_full,
            "closed_for_abuse": self.closed_abuse,
            "frames_sent": sum(c.frames for c in self.conns),
        }


class _Session:
    """The PubSub protocol of one connection (sync handling of each message)."""

    def __init__(self, conn: RpcConn, sockets: RpcSockets) -> None:
        self.conn, self.sockets = conn, sockets
        self.mux = sockets.mux
        rpc = sockets.cfg.rpc
        self.max_subs = rpc.max_subscriptions
        self.programs = frozenset((*rpc.allowed_programs, sockets.cfg.lottery.program_id))
        self.rate = rpc.per_client_rps
        conn.allowance = max(1.0, 2 * self.rate)

    def _strike(self, frame: bytes) -> None:
        self.conn.strikes += 1
        if self.conn.strikes >= _MAX_STRIKES:
            self.sockets.closed_abuse += 1
            self.conn.close(wsframes.CLOSE_POLICY_VIOLATION, "too many invalid messages")
        else:
            self.conn.send_frame(frame)

    def _over_rate(self) -> bool:
        if self.rate <= 0:
            return False
        now = trio.current_time()
        conn = self.conn
        conn.allowance = min(max(1.0, 2 * self.rate), conn.allowance + (now - conn.stamp) * self.rate)
        conn.stamp = now
        if conn.allowance < 1:
            return True
        conn.allowance -= 1
        return False

    # -- ws.Handler: driven by ws.receive, the same RFC 6455 receive side as /ws --

    @property
    def closing(self) -> bool:
        return self.conn.closing

    async def send_close(self, code: int, reason: str = "") -> None:
        self.conn.close(code, reason)

    def on_frames(self, frames: int) -> None:
        # Any input proves the peer alive; frames that complete no message (continuations)
        # cost a call of the client's rate too, so none can be sent endlessly for free.
        self.conn.last_seen = trio.current_time()
        unpaid, self.conn.charged = frames - self.conn.charged, frames
        for _ in range(min(unpaid, 64)):
            if self._over_rate():
                self._strike(error_frame(None, policy.INVALID_REQUEST, "too many frames: slow down"))
                return

    async def on_event(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig, frames: int) -> None:
        self.conn.charged = frames  # a message's own frame is paid as a call in handle()
        self.handle(event)

    def handle(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig) -> bool:
        """Act on one event; False when the connection should end."""
        conn = self.conn
        if isinstance(event, wsframes.Control):
            if event.opcode == wsframes.OP_PING:
                conn.send_frame(wsframes.encode_frame(wsframes.OP_PONG, event.payload))
            return True
        if isinstance(event, wsframes.TooBig):
            self._strike(error_frame(None, policy.INVALID_REQUEST, f"message of {event.size} bytes is too large"))
        elif not event.text:
            self._strike(error_frame(None, policy.INVALID_REQUEST, "binary frames are not supported: send JSON text"))
        else:
            self.on_text(event.data)
        return not conn.closing

    def on_text(self, data: bytes) -> None:
        try:
            message: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._strike(error_frame(None, policy.PARSE_ERROR, "Parse error"))
            return
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or not isinstance(message.get("method"), str):
            req_id = message.get("id") if isinstance(message, dict) else None
            self._strike(error_frame(req_id if _valid_id(req_id) else None, policy.INVALID_REQUEST, "Invalid request"))
            return
        method, req_id = message["method"], message.get("id")
        if "id" not in message:
            return  # a notification (web3.js and kit send {"method": "ping"}): no answer
        if not _valid_id(req_id):
            self._strike(error_frame(None, policy.INVALID_REQUEST, "Invalid request"))
            return
        if self._over_rate():
            self._strike(error_frame(req_id, 429, f"Too many requests: over {self.rate:g} messages/s"))
            return
        params = message.get("params")
        if method in policy.SUBSCRIBE_METHODS:
            self._subscribe(method, params, req_id)
        elif method in policy.UNSUBSCRIBE_METHODS:
            if not isinstance(params, list) or len(params) != 1:
                self.conn.send_frame(error_frame(req_id, policy.INVALID_PARAMS, "Invalid params: expected [id]"))
            elif self.mux.unsubscribe(self.conn, params[0], policy.UNSUBSCRIBE_METHODS[method]):
                self.conn.send_frame(reply_frame(req_id, True))
            else:
                self.conn.send_frame(error_frame(req_id, policy.INVALID_PARAMS, "Invalid subscription id."))
        else:
            self._strike(error_frame(req_id, policy.METHOD_NOT_FOUND, "Method not found"))

    def _subscribe(self, method: str, params: Any, req_id: Any) -> None:
        try:
            canonical = policy.check_subscription(method, params, self.programs)
        except policy.InvalidParams as exc:
            self.conn.send_frame(error_frame(req_id, policy.INVALID_PARAMS, str(exc)))
            return
        if self.conn.subscriptions() >= self.max_subs:
            msg = f"Too many subscriptions: at most {self.max_subs} per connection"
            self.conn.send_frame(error_frame(req_id, _TOO_MANY, msg))
            return
        sub = self.mux.subscribe(self.conn, method, canonical, req_id)
        self.conn.subs[sub] = None


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


async def accept_rpc_ws(stream: trio.SocketStream, request: Request, rest: bytes, sockets: RpcSockets
                        ) -> Coroutine[Any, Any, None] | None:
    """Answer a ``GET /rpc`` upgrade; the session to await, or None when refused (and answered)."""
    try:
        key = check_upgrade(request, sockets.cfg)
        with trio.fail_after(_HANDSHAKE_SEND_TIMEOUT):
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: " + wsframes.accept_key(key).encode() + b"\r\n\r\n"
            )
    except BadRequest as exc:
        try:
            with trio.move_on_after(_HANDSHAKE_SEND_TIMEOUT):
                await stream.send_all(error_response(exc.status, exc.code, exc.message, date=_DATE.get()))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await stream.aclose()
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
        await stream.aclose()
        return None
    return serve_rpc_ws(stream, sockets, rest)


async def serve_rpc_ws(stream: trio.SocketStream, sockets: RpcSockets, rest: bytes) -> None:
    """Run one accepted /rpc WebSocket connection until close; never raises for peer errors."""
    cfg = sockets.cfg
    host, port = peer_of(stream)
    peer = f"{host}:{port}"
    started = trio.current_time()
    conn = RpcConn(stream.socket, peer)
    if len(sockets.conns) >= cfg.ws.max_clients:
        sockets.refused_full += 1
        conn.close(wsframes.CLOSE_TRY_AGAIN_LATER, "server full, try again later")
        await stream.aclose()
        return
    sockets.conns[conn] = None
    sockets.connected_total += 1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.flush, cfg.ws.send_timeout)
            nursery.start_soon(_heartbeat, conn, cfg.ws.ping_interval)
            parser = wsframes.FrameParser(cfg.ws.max_message_size, max_fragments=MAX_FRAGMENTS)
            await receive(stream, _Session(conn, sockets), parser, peer=peer, unread=rest, cancel_scope=conn.scope,
                          read_size=65536)
            nursery.cancel_scope.cancel()
    except trio.Cancelled:
        conn.close(wsframes.CLOSE_GOING_AWAY, "server shutting down")  # no-op when already closing
        raise
    finally:
        sockets.conns.pop(conn, None)
        sockets.mux.drop(conn, list(conn.subs))
        conn.close(None)
        await trio.aclose_forcefully(stream)  # ws.receive closed it, unless cancelled before
        access_log.info("rpc ws %s closed after %.1fs", peer, trio.current_time() - started)


async def _heartbeat(conn: RpcConn, interval: float) -> None:
    # A peer that vanished without a FIN would otherwise hold its subscriptions forever.
    while True:
        await trio.sleep(interval)
        if conn.last_seen < trio.current_time() - 2 * interval:
            conn.close(wsframes.CLOSE_GOING_AWAY, "no answer to ping")
            return
        conn.send_frame(wsframes.PING_FRAME)
