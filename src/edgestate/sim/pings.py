"""Seeing a PubSub client's WebSocket pings, which ASGI does not show the app.

Helius closes a PubSub socket on which the client sent nothing for 10 minutes, pings
included; the simulator does the same (``World.ws_idle_timeout``), so it must see pings.
Hypercorn answers them itself; hypercorn_glue.report_websocket_pings (the one module
that touches Hypercorn's internals) reports them by client address. When Hypercorn's
internals differ, pings are simply not seen (only messages then reset the idle timer)
and a warning is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import hypercorn_glue

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


def _report(client: tuple[Any, ...]) -> None:
    hook = _watchers.get(client)
    if hook is not None:
        hook()


def install() -> None:
    """Start seeing pings (idempotent, safe for other apps in the process)."""
    global _installed
    if _installed:
        return
    _installed = True
    if not hypercorn_glue.report_websocket_pings(_report):
        log.warning("simulator: cannot see WebSocket pings with this Hypercorn; only messages count as activity")
