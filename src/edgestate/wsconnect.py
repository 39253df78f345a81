"""Outgoing WebSocket connections we own end to end: the provider's PubSub, a parent's /ws.

trio-websocket 0.12 leaves the TCP stream open after a server-initiated close and has no
keepalive (STACK-NOTES), so the stream is opened and closed here, and pings are ours.
"""

from __future__ import annotations

import json
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket

# Failures of a connection that a reconnect loop retries (anything else is a bug).
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
    """The retryable failure in ``exc``, looking inside a session nursery's exception group.

    None when ``exc`` holds anything else (a bug, or Cancelled), which must propagate.
    """
    expected = NETWORK_ERRORS + extra
    if isinstance(exc, expected):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(expected)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf
    return None


def json_object(text: str | bytes, error: type[Exception], peer: str) -> dict[str, Any]:
    """A received message as a JSON object, else ``error`` naming ``peer``."""
    try:
        message = json.loads(text)
    except ValueError:
        raise error(f"{peer} sent a message that is not JSON") from None
    if not isinstance(message, dict):
        raise error(f"{peer} sent a JSON message that is not an object")
    return message
