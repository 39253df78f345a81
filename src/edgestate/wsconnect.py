"""Outgoing WebSocket connections we own end to end: the provider's PubSub, a parent's /ws.

trio-websocket 0.12 leaves the TCP stream open after a server-initiated close and has no
keepalive (STACK-NOTES), so the stream is opened and closed here, and pings are ours.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

log = logging.getLogger("edgestate.wsconnect")

# Failures of a connection that a reconnect loop expects (anything else is logged as a bug, then retried).
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
)


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    message_queue_size: int,
    max_message_size: int,
    ping_interval: float,
    connect_timeout: float = 10.0,
    on_pong: Callable[[], None] | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect to ``url`` (ws:// or wss://) and keep the connection pinged.

    A ping unanswered for ``ping_interval`` raises ``TooSlowError`` out of the block;
    ``on_pong()`` is called for each answered one (the connection is alive now).
    Leaving the block closes the TCP stream without a close handshake: sessions end on
    an error, on a server close (already answered) or at shutdown, when waiting on the
    handshake would only stall.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(connect_timeout):
        if secure:
            stream: Any = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl.create_default_context())
        else:
            stream = await trio.open_tcp_stream(host, port)
    async with stream, trio.open_nursery() as nursery:
        with trio.fail_after(connect_timeout):
            conn = await trio_websocket.wrap_client_stream(
                nursery, stream, host, resource, message_queue_size=message_queue_size,
                max_message_size=max_message_size,
            )
        nursery.start_soon(_keepalive, conn, ping_interval, on_pong)
        try:
            yield conn
        finally:
            nursery.cancel_scope.cancel()


async def _keepalive(
    conn: trio_websocket.WebSocketConnection, interval: float, on_pong: Callable[[], None] | None = None
) -> None:
    # A peer that vanished without a FIN would otherwise look connected forever.
    while True:
        await trio.sleep(interval)
        with trio.fail_after(interval):
            await conn.ping()
        if on_pong is not None:
            on_pong()


def backoff_delay(failures: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**failures)]."""
    return random.uniform(0, min(cap, base * 2 ** min(failures, 10)))


def network_failure(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """The failure in ``exc`` that costs only this upstream session (reconnect with backoff).

    Looks inside a session nursery's exception group. Network errors (and ``extra``) are
    expected. Anything else that is an ``Exception`` (a bug met on a hostile message, say)
    is logged with its traceback and also costs only the session: one upstream connection
    must not end the process. None for ``Cancelled`` and other ``BaseException``s, which
    must propagate.
    """
    expected = NETWORK_ERRORS + extra
    if isinstance(exc, expected):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(expected)
        if matched is not None and rest is None:
            return _first_leaf(matched)
    if isinstance(exc, Exception):  # an ExceptionGroup holds Exceptions only
        log.error("unexpected error in an upstream WebSocket session (reconnecting)", exc_info=exc)
        return _first_leaf(exc)
    return None


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def json_object(text: str | bytes, error: type[Exception], peer: str) -> dict[str, Any]:
    """A received message as a JSON object, else ``error`` naming ``peer``."""
    try:
        message = json.loads(text)
    except ValueError:
        raise error(f"{peer} sent a message that is not JSON") from None
    if not isinstance(message, dict):
        raise error(f"{peer} sent a JSON message that is not an object")
    return message
