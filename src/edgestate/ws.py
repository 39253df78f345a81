"""The /ws endpoint: handshake and the per-connection protocol of the contract.

The front door (server.py) hands over connections whose request line is ``GET /ws``.
Writes go through :class:`~edgestate.broadcast.Client` (non-blocking, never awaited by
the broadcaster); this task only reads: handshake, then client messages until the
peer leaves or the hub closes it.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

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
# Every frame counts (data, continuation and control alike): 20 a second, bursts of 40.
_MSG_RATE, _MSG_BURST = 20.0, 40.0
# Fragments of one message; its bytes are capped by ws.max_message_size. Browsers do not
# fragment small messages; an endless run of continuation frames is skipped (TooBig) and
# struck by the rate limit instead of growing memory.
MAX_FRAGMENTS = 32  # frames of one message (/ws and /rpc); a message in more is refused
# How long the closing handshake may take once we closed or failed the connection.
_CLOSE_TIMEOUT = 2.0

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


class Handler(Protocol):
    """The per-connection protocol above the frames, driven by :func:`receive`.

    /ws's is :class:`_Session` (contract messages, strikes, message rate); the
    compliance echo server has its own. Frames never reach a handler after a close.
    """

    @property
    def closing(self) -> bool:
        """True once this side has closed (its close frame sent, or the socket given up)."""
        ...

    async def on_event(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig, frames: int) -> None:
        """Act on a message, a ping or pong, or a message skipped as too big.

        ``frames`` is the parser's count of frames so far (every opcode), for rate limits.
        """
        ...

    def on_frames(self, frames: int) -> None:
        """Called after each read's events with the same count, so frames that completed
        no event (continuations, a message still open) count too."""
        ...

    async def send_close(self, code: int, reason: str = "") -> None:
        """Send a close frame, at most once, and stop sending anything else."""
        ...


@functools.lru_cache(maxsize=8)
def _size_error(max_size: int) -> bytes:
    # One frame for every session (not one each: per-connection bytes are what 100k multiply).
    return _error_frame(f"message too large: at most {max_size} bytes")


class _Session:
    """/ws message handling: the contract's replies, strikes and the frame rate."""

    __slots__ = ("client", "hub", "strikes", "allowance", "stamp", "charged", "max_size")

    def __init__(self, client: Client, hub: Hub, cfg: Config) -> None:
        self.client, self.hub = client, hub
        self.strikes = 0
        self.allowance = _MSG_BURST
        self.stamp = trio.current_time()
        self.charged = 0  # frames already paid for out of the rate allowance
        self.max_size = cfg.ws.max_message_size

    @property
    def closing(self) -> bool:
        return self.client.closing

    async def send_close(self, code: int, reason: str = "") -> None:
        self.client.close(code, reason)

    def _strike(self, frame: bytes) -> None:
        self.strikes += 1
        if self.strikes >= _MAX_STRIKES:
            self.client.close(wsframes.CLOSE_POLICY_VIOLATION, "too many invalid messages")
        else:
            self.client.send_reply(frame)

    def _pay(self, frames: int) -> bool:
        # Token bucket: every frame costs one token, control and continuation frames too,
        # so no kind of frame can be sent endlessly for free.
        now = trio.current_time()
        self.allowance = min(_MSG_BURST, self.allowance + (now - self.stamp) * _MSG_RATE)
        self.stamp = now
        self.allowance -= frames
        if self.allowance < 0:
            self.allowance = 0.0
            return False
        return True

    def on_frames(self, frames: int) -> None:
        self.client.last_seen = trio.current_time()  # any input proves the peer alive (heartbeat)
        unpaid, self.charged = frames - self.charged, frames
        if unpaid > 0 and not self._pay(unpaid):
            self._strike(_ERR_RATE)

    async def on_event(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig, frames: int) -> None:
        # The event's own (final) frame; its earlier fragments are paid by on_frames.
        if self.charged < frames:
            self.charged += 1
            if not self._pay(1):
                self._strike(_ERR_RATE)
                return
        client = self.client
        if isinstance(event, wsframes.Control):
            if event.opcode == wsframes.OP_PING:
                client.send_reply(wsframes.encode_frame(wsframes.OP_PONG, event.payload))
        elif isinstance(event, wsframes.TooBig):
            self._strike(_size_error(self.max_size))
        elif not event.text:
            self._strike(_ERR_BINARY)
        else:
            self._on_text(event.data)

    def _on_text(self, data: bytes) -> None:
        try:
            message: Any = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nesting like [[[[... (~1000 deep)
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
    """Run one /ws connection from handshake to close.

    Never raises for peer errors or for a bug met on this connection (logged with the
    peer, answered 1011 after the handshake); the stream is always closed.

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
        parser = wsframes.FrameParser(cfg.ws.max_message_size, max_fragments=MAX_FRAGMENTS)
        unread, client.unread = client.unread, b""
        session = _Session(client, hub, cfg)
        await receive(stream, session, parser, peer=client.peer, unread=unread, cancel_scope=client.cancel_scope)
    finally:
        client.close(None)  # no-op when already closing; stops every further write
        access_log.info("ws %s closed after %.1fs", client.peer, trio.current_time() - started)


async def _handshake(stream: trio.SocketStream, request: Request, rest: bytes, hub: Hub, cfg: Config,
                     peer: str) -> Client | None:
    """Answer the upgrade; the registered client, or None when refused."""
    try:
        key = check_upgrade(request, cfg)
        with trio.fail_after(_HANDSHAKE_SEND_TIMEOUT):
            await stream.send_all(wsframes.switching_protocols(key))
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


class _End(enum.Enum):
    PEER_CLOSED = "the peer closed and we answered"
    FAILED = "we failed the connection (protocol error, internal error)"
    LOCAL = "we closed first"
    GONE = "the TCP connection ended without a closing handshake"


async def receive(
    stream: trio.SocketStream,
    handler: Handler,
    parser: wsframes.FrameParser,
    *,
    peer: str,
    unread: bytes = b"",
    cancel_scope: trio.CancelScope | None = None,
    read_size: int = 4096,
) -> None:
    """Run a connection's receive side after the handshake, then close it as RFC 6455 asks.

    Frames go to ``handler`` until a close. A close from the peer is answered with the
    same code (1000 when it gave none) and the TCP connection is closed at once. A
    protocol violation is answered with 1002 (1007 for invalid UTF-8), an exception in
    ``handler`` is logged with the peer and answered with 1011; then the TCP connection
    is dropped. When this side closed first (``handler.closing``, or ``cancel_scope``
    cancelled by whoever closed it) the peer's close frame is awaited for a few seconds.
    The stream is always closed on return. Never raises for anything the peer sends or
    a bug in ``handler``; only cancellation from outside passes through.

    Args:
        stream: the connection, after the handshake.
        handler: what acts on the messages.
        parser: the frame parser of this connection (its limits apply).
        peer: ``host:port`` of the client, for the log.
        unread: bytes that arrived with the handshake.
        cancel_scope: cancelled by a third party (the hub) that closed the connection.
        read_size: bytes per read.
    """
    end = _End.LOCAL  # what a cancelled cancel_scope means: the hub closed the client
    try:
        with cancel_scope or trio.CancelScope():
            # The loop lives in this frame (no nested coroutine) while the peer is idle:
            # per-connection memory is what 100k clients multiply.
            try:
                data = unread
                while True:
                    if data and (found := await _process(handler, parser, data, peer)) is not None:
                        end = found
                        break
                    data = await stream.receive_some(read_size)
                    if not data:
                        end = _End.GONE
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                end = _End.GONE
            except Exception:  # a bug or a resource error on one connection, never the server's
                log.exception("ws %s: unexpected error, closing the connection with 1011", peer)
                end = _End.FAILED
                try:
                    await handler.send_close(wsframes.CLOSE_INTERNAL_ERROR, "internal error")
                except Exception:  # the socket is dropped next anyway
                    pass
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            if end is _End.FAILED:
                await _drop(stream)
            elif end is _End.LOCAL:
                await _await_close(stream, parser, read_size)
    finally:
        await trio.aclose_forcefully(stream)


async def _process(handler: Handler, parser: wsframes.FrameParser, data: bytes, peer: str) -> _End | None:
    """Hand one read's events to ``handler``; how the connection ends, or None to go on."""
    for event in parser.feed(data):
        if isinstance(event, wsframes.Close):
            code = wsframes.CLOSE_NORMAL if event.code == wsframes.CLOSE_NO_STATUS else event.code
            await handler.send_close(code)
            return _End.PEER_CLOSED
        if isinstance(event, wsframes.Failure):
            log.debug("ws %s: protocol error: %s", peer, event.reason)
            await handler.send_close(event.code, event.reason)
            return _End.FAILED
        await handler.on_event(event, parser.frames)
        if handler.closing:
            return _End.LOCAL
    handler.on_frames(parser.frames)
    return _End.LOCAL if handler.closing else None


async def _drop(stream: trio.SocketStream) -> None:
    # Fail the connection: our close frame, then FIN. Reading what the peer still sends
    # (until its FIN or the deadline) keeps unread input from turning the close into a
    # reset that could destroy our close frame before the peer reads it.
    try:
        await stream.send_eof()
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
        pass


async def _await_close(stream: trio.SocketStream, parser: wsframes.FrameParser, read_size: int) -> None:
    # We closed first: wait for the peer's close frame (RFC 6455 7.1.1), then close TCP.
    try:
        while data := await stream.receive_some(read_size):
            for event in parser.feed(data):
                if isinstance(event, (wsframes.Close, wsframes.Failure)):
                    return
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
