"""The /ws endpoint: handshake and the per-connection protocol of the contract.

The front door (server.py) hands over connections whose request line is ``GET /ws``.
Writes go through :class:`~edgestate.broadcast.Client` (non-blocking, never awaited by
the broadcaster); this task only reads: handshake, then client messages until the
peer leaves or the hub closes it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Coroutine
from typing import Any

import trio

from . import wsframes
from .broadcast import Client, Hub
from .config import Config
from .errors import BadRequest
from .heads import Request
from .listen import peer_of
from .origins import policy_for
from .views import HttpDate, error_response

log = logging.getLogger("edgestate.ws")
access_log = logging.getLogger("edgestate.access")

_HANDSHAKE_SEND_TIMEOUT = 10.0
_DATE = HttpDate()
# Abuse policy: this many bad frames (or frames over the message rate) → close 1008.
_MAX_STRIKES = 10
_MSG_RATE, _MSG_BURST = 20.0, 40.0

_PONG = wsframes.text_frame(b'{"type":"pong"}')


def _error_frame(message: str) -> bytes:
    return wsframes.text_frame(json.dumps({"type": "error", "error": message}).encode())


_ERR_JSON = _error_frame('malformed JSON: expected an object like {"type": "getState"}')
_ERR_TYPE = _error_frame("unknown message type: expected getState or ping")
_ERR_BINARY = _error_frame("binary frames are not supported: send JSON text")
_ERR_RATE = _error_frame("too many messages: slow down")


def _http_error(exc: BadRequest) -> bytes:
    extra = [(b"sec-websocket-version", b"13")] if exc.status == 426 else []
    return error_response(exc.status, exc.code, exc.message, date=_DATE.get(), extra=extra)


def check_upgrade(request: Request, cfg: Config) -> str:
    """The client's Sec-WebSocket-Key, once the upgrade request is found acceptable.

    Raises:
        BadRequest: 426 (not an upgrade, or not version 13), 400 (bad key), 403 (origin).
    """
    headers = request.headers
    if "websocket" not in request.header_tokens("upgrade") or "upgrade" not in request.header_tokens("connection"):
        raise BadRequest(426, "upgrade_required", f"{request.path} is a WebSocket endpoint: send an Upgrade: websocket request")
    if headers.get("sec-websocket-version") != "13":
        raise BadRequest(426, "upgrade_required", "unsupported WebSocket version (13 required)")
    key = headers.get("sec-websocket-key", "")
    if len(key) != 24 or not _is_base64_16(key):
        raise BadRequest(400, "bad_request", "missing or invalid Sec-WebSocket-Key")
    origin = headers.get("origin")
    if origin is not None and not policy_for(cfg.server.allowed_origins).allows(origin):
        raise BadRequest(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
    return key


def _is_base64_16(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


class _Session:
    """Per-connection message handling (strikes, message rate, replies)."""

    __slots__ = ("client", "hub", "cfg", "strikes", "allowance", "stamp", "size_error")

    def __init__(self, client: Client, hub: Hub, cfg: Config) -> None:
        self.client, self.hub, self.cfg = client, hub, cfg
        self.strikes = 0
        self.allowance = _MSG_BURST
        self.stamp = trio.current_time()
        self.size_error = _error_frame(f"message too large: at most {cfg.ws.max_message_size} bytes")

    def _strike(self, frame: bytes) -> None:
        self.strikes += 1
        if self.strikes >= _MAX_STRIKES:
            self.client.close(wsframes.CLOSE_POLICY_VIOLATION, "too many invalid messages")
        else:
            self.client.send_reply(frame)

    def _over_rate(self) -> bool:
        now = trio.current_time()
        self.allowance = min(_MSG_BURST, self.allowance + (now - self.stamp) * _MSG_RATE)
        self.stamp = now
        if self.allowance < 1:
            return True
        self.allowance -= 1
        return False

    def handle(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig) -> bool:
        """Act on one event; False when the connection should end."""
        client = self.client
        if isinstance(event, wsframes.Control):
            if event.opcode == wsframes.OP_PING:
                client.send_reply(wsframes.encode_frame(wsframes.OP_PONG, event.payload))
            elif event.opcode == wsframes.OP_CLOSE:
                code = wsframes.parse_close(event.payload)
                client.close(wsframes.CLOSE_NORMAL if code in (1005, 1006) else code)
                return False
            return True
        if self._over_rate():
            self._strike(_ERR_RATE)
        elif isinstance(event, wsframes.TooBig):
            self._strike(self.size_error)
        elif not event.text:
            self._strike(_ERR_BINARY)
        else:
            self._on_text(event.data)
        return not client.closing

    def _on_text(self, data: bytes) -> None:
        try:
            message: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            self._strike(_ERR_JSON)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "getState":
            self.hub.send_current(self.client)
        elif kind == "ping":
            self.client.send_reply(_PONG)
        elif isinstance(message, dict):
            self._strike(_ERR_TYPE)
        else:
            self._strike(_ERR_JSON)


async def serve_ws(stream: trio.SocketStream, request: Request, rest: bytes, hub: Hub, cfg: Config) -> None:
    """Run one /ws connection from handshake to close; never raises for peer errors.

    Args:
        request: the upgrade request, parsed by the front door.
        rest: bytes that arrived after the request head (the client's first frames).
    """
    session = await accept_ws(stream, request, rest, hub, cfg)
    del request, rest  # nothing of the HTTP side stays for the connection's lifetime
    if session is not None:
        await session


async def accept_ws(stream: trio.SocketStream, request: Request, rest: bytes, hub: Hub, cfg: Config
                    ) -> Coroutine[Any, Any, None] | None:
    """The handshake; then the session to await, or None when it was refused (and answered).

    Two steps, so that the caller's frames holding the parsed request are gone while the
    session lives: per-connection memory is what 100k clients multiply. The session is
    the coroutine itself (its frame is the only per-connection object it adds).
    """
    host, port = peer_of(stream)
    peer = f"{host}:{port}"
    client = await _handshake(stream, request, rest, hub, cfg, peer)
    if client is None:
        await stream.aclose()
        return None
    return run_ws(stream, client, hub, cfg, trio.current_time())


async def run_ws(stream: trio.SocketStream, client: Client, hub: Hub, cfg: Config, started: float) -> None:
    """A registered client's session: its messages until it leaves or is closed."""
    try:
        await _receive_loop(stream, client, hub, cfg)
    finally:
        client.close(None)  # no-op when already closing; stops every further write
        with trio.CancelScope(shield=True):
            await _linger(stream)
        access_log.info("ws %s closed after %.1fs", client.peer, trio.current_time() - started)


async def _handshake(stream: trio.SocketStream, request: Request, rest: bytes, hub: Hub, cfg: Config,
                     peer: str) -> Client | None:
    """Answer the upgrade; the registered client, or None when refused."""
    try:
        key = check_upgrade(request, cfg)
        with trio.fail_after(_HANDSHAKE_SEND_TIMEOUT):
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: " + wsframes.accept_key(key).encode() + b"\r\n\r\n"
            )
    except BadRequest as exc:
        log.debug("ws %s refused: %d %s", peer, exc.status, exc.message)
        hub.refused_handshake += 1
        try:
            with trio.move_on_after(_HANDSHAKE_SEND_TIMEOUT):
                await stream.send_all(_http_error(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
        return None
    client = Client(hub, stream.socket, peer)
    client.unread = rest
    if hub.is_full():
        hub.refused_full += 1
        client.close(wsframes.CLOSE_TRY_AGAIN_LATER, "server full, try again later")
        return None
    hub.add(client)
    return client


async def _receive_loop(stream: trio.SocketStream, client: Client, hub: Hub, cfg: Config) -> None:
    session = _Session(client, hub, cfg)
    parser = wsframes.FrameParser(cfg.ws.max_message_size)
    data, client.unread = client.unread, b""
    try:
        with client.cancel_scope:
            while True:
                if data:
                    client.last_seen = trio.current_time()
                    for event in parser.feed(data):
                        if not session.handle(event):
                            break
                    if client.closing:
                        return
                data = await stream.receive_some(4096)
                if not data:
                    return
    except wsframes.ProtocolError as exc:
        log.debug("ws %s: protocol error: %s", client.peer, exc)
        client.close(wsframes.CLOSE_PROTOCOL_ERROR, str(exc)[:100])
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _linger(stream: trio.SocketStream) -> None:
    # Give the peer a moment to read our close frame and answer it, so unread input
    # does not turn our close into a reset; then release the socket.
    with trio.move_on_after(1.0):
        try:
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await stream.aclose()
