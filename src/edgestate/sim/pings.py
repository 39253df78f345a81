"""Seeing a PubSub client's WebSocket pings, which ASGI does not show the app.

Helius closes a PubSub socket on which the client sent nothing for 10 minutes, pings
included; the simulator does the same (``World.ws_idle_timeout``), so it must see pings.
Hypercorn answers them itself, so this module wraps the wsproto connection of each
accepted WebSocket stream in a spy that reports pings by client address. It is the
simulator's only reach into Hypercorn internals (hypercorn.protocol.ws_stream, checked
with hypercorn 0.18); when they differ, pings are simply not seen (only messages
then reset the idle timer) and a warning is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger("edgestate.sim")

_watchers: dict[tuple[Any, ...], Callable[[], None]] = {}
_installed = False


def watch(client: tuple[Any, ...] | None, on_ping: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_ping()`` for each ping from ``client`` (host, port); returns the unwatch."""
    if client is None:
        return lambda: None
    _watchers[client] = on_ping

    def unwatch() -> None:
        if _watchers.get(client) is on_ping:
            del _watchers[client]

    return unwatch


class _PingSpy:
    """A wsproto Connection that reports the Ping events it hands out."""

    def __init__(self, inner: Any, client: tuple[Any, ...] | None) -> None:
        self._inner = inner
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def events(self) -> Generator[Any, None, None]:
        from wsproto.events import Ping

        for event in self._inner.events():
            if isinstance(event, Ping) and self._client is not None:
                hook = _watchers.get(self._client)
                if hook is not None:
                    hook()
            yield event


def install() -> None:
    """Wrap Hypercorn's WebSocket streams once (idempotent, safe for other apps)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from hypercorn.protocol.ws_stream import WSStream

        original = WSStream._accept
    except (ImportError, AttributeError):
        log.warning("simulator: cannot see WebSocket pings with this Hypercorn; only messages count as activity")
        return

    async def _accept(self: Any, message: Any) -> None:
        await original(self, message)
        connection = getattr(self, "connection", None)
        if connection is not None and not isinstance(connection, _PingSpy):
            client = tuple(self.client) if getattr(self, "client", None) else None
            self.connection = _PingSpy(connection, client)

    WSStream._accept = _accept  # type: ignore[method-assign]
