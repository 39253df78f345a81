"""The /ws endpoint: handshake and the per-connection protocol of the contract.

The front door (server.py) hands over connections whose request line is ``GET /ws``.
Writes go through :class:`~edgestate.broadcast.Client` (non-blocking, never awaited by
the broadcaster); this task only reads: handshake, then client messages until the
peer leaves or the hub closes it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio

from . import wsframes
from .broadcast import Client, Hub
from .config import Config

log = logging.getLogger("edgestate.ws")
access_log = logging.getLogger("edgestate.access")

_MAX_HEAD = 8192
_HANDSHAKE_TIMEOUT = 10.0
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


class HandshakeError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _http_error(status: int, code: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 426: "Upgrade Required", 431: "Request Header Fields Too Large"}
    return (
        f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
    ).encode() + body


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    buf = bytearray()
    with trio.move_on_after(_HANDSHAKE_TIMEOUT):
        while b"\r\n\r\n" not in buf:
            if len(buf) > _MAX_HEAD:
                raise HandshakeError(431, "headers_too_large", f"request head over {_MAX_HEAD} bytes")
            data = await stream.receive_some(4096)
            if not data:
                raise HandshakeError(400, "bad_request", "connection closed during handshake")
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        return head, rest
    raise HandshakeError(400, "bad_request", "handshake timed out")


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET":
        raise HandshakeError(400, "bad_request", "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeError(400, "bad_request", "malformed header line")
        key = name.strip().lower()
        # Repeated headers fold with commas, as HTTP allows.
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return parts[1], headers


def _check_upgrade(headers: dict[str, str], cfg: Config) -> str:
    if headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in headers.get("connection", "").lower():
        raise HandshakeError(426, "upgrade_required", "/ws is a WebSocket endpoint: send an Upgrade: websocket request")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "upgrade_required", "unsupported WebSocket version (13 required)")
    key = headers.get("sec-websocket-key", "")
    if len(key) != 24:
        raise HandshakeError(400, "bad_request", "missing or invalid Sec-WebSocket-Key")
    origin = headers.get("origin")
    allowed = cfg.server.allowed_origins
    if allowed and origin is not None and origin not in allowed:
        raise HandshakeError(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
    return key


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


async def serve_ws(stream: trio.SocketStream, hub: Hub, cfg: Config) -> None:
    """Run one /ws connection from handshake to close; never raises for peer errors."""
    peer = _peer(stream)
    started = trio.current_time()
    client = await _handshake(stream, hub, cfg, peer)
    if client is None:
        await stream.aclose()
        return
    try:
        await _receive_loop(stream, client, hub, cfg)
    finally:
        client.close(None)  # no-op when already closing; stops every further write
        with trio.CancelScope(shield=True):
            await _linger(stream)
        access_log.info("ws %s closed after %.1fs", peer, trio.current_time() - started)


async def _handshake(stream: trio.SocketStream, hub: Hub, cfg: Config, peer: str) -> Client | None:
    """Answer the upgrade; the registered client, or None when refused."""
    try:
        head, rest = await _read_head(stream)
        _path, headers = _parse_head(head)
        key = _check_upgrade(headers, cfg)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + wsframes.accept_key(key).encode() + b"\r\n\r\n"
        )
    except HandshakeError as exc:
        try:
            await stream.send_all(_http_error(exc.status, exc.code, exc.message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
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


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


async def accept_upgrade(stream: trio.SocketStream, cfg: Config) -> bytes | None:
    """Read and answer a WebSocket upgrade for another endpoint (e.g. /rpc).

    Same checks as /ws (Upgrade headers, version 13, key, Origin allowlist). Returns
    the bytes read past the request head (the first frames), or None when refused
    (the HTTP error was sent).
    """
    try:
        head, rest = await _read_head(stream)
        _path, headers = _parse_head(head)
        key = _check_upgrade(headers, cfg)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + wsframes.accept_key(key).encode() + b"\r\n\r\n"
        )
    except HandshakeError as exc:
        try:
            await stream.send_all(_http_error(exc.status, exc.code, exc.message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    return rest
