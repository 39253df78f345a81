"""The provider's PubSub WebSocket: one connection carrying every subscription, kept alive.

``accountSubscribe`` pushes every change of an account (the lottery pot) the moment it
lands on chain; ``programSubscribe`` pushes every change of an account a program owns that
matches the filters (a participant joining). Both ask ``dataSlice`` length 0: only
lamports and addresses travel, which is what providers meter.

Subscriptions die with the socket, so each reconnect subscribes again and calls
``on_state(True)`` so the owner can read the values once (nothing changed while
disconnected is missed). Pings go out every ``ping_interval`` (providers close sockets
idle for 10 minutes); every answered ping calls ``on_alive()``: the subscriptions on this
socket are live, so what they pushed is still current. Reconnects back off exponentially
with full jitter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_websocket

from ..config import redact
from ..telemetry import describe
from ..wsconnect import backoff_delay, json_object, network_failure, open_websocket

log = logging.getLogger("edgestate.upstream.pubsub")

_CONNECT_TIMEOUT = 10.0
_MAX_MESSAGE = 1 << 20
_BACKOFF_BASE, _BACKOFF_CAP = 0.5, 30.0
_NO_DATA = {"offset": 0, "length": 0}


class PubSubError(Exception):
    """A PubSub protocol problem (bad reply, subscription refused)."""


@dataclass(slots=True)
class AccountWatch:
    """``accountSubscribe(pubkey)``: ``on_change(lamports or None if gone, slot)``."""

    pubkey: str
    on_change: Callable[[int | None, int], None]
    name: str = "account"
    notifications: int = 0

    def request(self, commitment: str) -> tuple[str, list[Any]]:
        config = {"encoding": "base64", "commitment": commitment, "dataSlice": _NO_DATA}
        return "accountSubscribe", [self.pubkey, config]

    def handle(self, method: str, result: Any) -> None:
        if method != "accountNotification":
            return
        try:
            slot = int(result["context"]["slot"])
            value = result["value"]
            lamports = None if value is None else int(value["lamports"])
        except (KeyError, TypeError, ValueError):
            raise PubSubError("malformed accountNotification") from None
        self.notifications += 1
        self.on_change(lamports, slot)


@dataclass(slots=True)
class ProgramWatch:
    """``programSubscribe(program, filters)``: ``on_change(pubkey, lamports, slot)``."""

    program_id: str
    filters: Sequence[Mapping[str, Any]]
    on_change: Callable[[str, int, int], None]
    name: str = "program"
    notifications: int = 0

    def request(self, commitment: str) -> tuple[str, list[Any]]:
        config = {
            "encoding": "base64",
            "commitment": commitment,
            "dataSlice": _NO_DATA,
            "filters": [_plain(f) for f in self.filters],
        }
        return "programSubscribe", [self.program_id, config]

    def handle(self, method: str, result: Any) -> None:
        if method != "programNotification":
            return
        try:
            slot = int(result["context"]["slot"])
            pubkey = result["value"]["pubkey"]
            lamports = int(result["value"]["account"]["lamports"])
        except (KeyError, TypeError, ValueError):
            raise PubSubError("malformed programNotification") from None
        if not isinstance(pubkey, str) or len(pubkey) > 44:
            raise PubSubError("programNotification without a pubkey")
        self.notifications += 1
        self.on_change(pubkey, lamports, slot)


Watch = AccountWatch | ProgramWatch


@dataclass(slots=True)
class _Counters:
    connects: int = 0
    reconnects: int = 0
    pongs: int = 0
    bytes_received: int = 0
    last_error: str | None = None
    by_watch: dict[str, int] = field(default_factory=dict)


class PubSub:
    """Keeps every ``watches`` subscription open on one connection to ``url``.

    Args:
        url: the provider's PubSub URL (ws:// or wss://; may carry an API key).
        watches: what to subscribe to; each gets its notifications (sync, fast).
        commitment: commitment level of the notifications.
        on_state: ``on_state(up)`` when all subscriptions are up, or when they go down.
        on_alive: called for every answered ping while up.
        ping_interval: keepalive pings; a missing pong for this long drops the socket.
    """

    def __init__(
        self,
        url: str,
        watches: Sequence[Watch],
        *,
        commitment: str,
        on_state: Callable[[bool], None],
        on_alive: Callable[[], None] = lambda: None,
        ping_interval: float = 20.0,
    ) -> None:
        self._url = url
        self._watches = list(watches)
        self._commitment = commitment
        self._on_state = on_state
        self._on_alive = on_alive
        self._ping_interval = ping_interval
        self.up = False
        self._n = _Counters()

    @property
    def connects(self) -> int:
        """Connections that got every subscription confirmed."""
        return self._n.connects

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, and resubscribe after every failure, until cancelled."""
        task_status.started()
        failures = 0
        while True:
            try:
                await self._session()
                failures = 0  # a session that ended cleanly (server closed) retries at once
            except BaseException as exc:
                error = network_failure(exc, (PubSubError, ValueError))
                if error is None:
                    raise
                failures += 1
                self._n.last_error = f"{type(error).__name__}: {redact(describe(error))}"[:200]
                # Once per outage; the reconnects after it are counted (/stats, /metrics).
                (log.warning if failures == 1 else log.debug)("PubSub %s: %s", redact(self._url), self._n.last_error)
            finally:
                if self.up:
                    self.up = False
                    self._on_state(False)
            self._n.reconnects += 1
            await trio.sleep(backoff_delay(failures, _BACKOFF_BASE, _BACKOFF_CAP))

    def _pong(self) -> None:
        self._n.pongs += 1
        if self.up:
            self._on_alive()

    async def _session(self) -> None:
        async with open_websocket(
            self._url, message_queue_size=16, max_message_size=_MAX_MESSAGE, ping_interval=self._ping_interval,
            connect_timeout=_CONNECT_TIMEOUT, on_pong=self._pong,
        ) as conn:
            await self._subscribed(conn)

    async def _receive(self, conn: trio_websocket.WebSocketConnection) -> dict[str, Any]:
        text = await conn.get_message()
        self._n.bytes_received += len(text)
        return json_object(text, PubSubError, "PubSub")

    async def _subscribed(self, conn: trio_websocket.WebSocketConnection) -> None:
        waiting: dict[int, Watch] = {}
        for request_id, watch in enumerate(self._watches, start=1):
            method, params = watch.request(self._commitment)
            await conn.send_message(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
            waiting[request_id] = watch
        by_subscription: dict[int, Watch] = {}
        with trio.fail_after(_CONNECT_TIMEOUT):
            while waiting:
                reply = await self._receive(conn)
                rid = reply.get("id")
                pending = waiting.pop(rid, None) if isinstance(rid, int) else None
                if pending is None:
                    self._dispatch(reply, by_subscription)
                    continue
                watch = pending
                result = reply.get("result")
                if "error" in reply or not isinstance(result, int) or isinstance(result, bool):
                    method = watch.request(self._commitment)[0]
                    raise PubSubError(f"{method} refused: {str(reply.get('error', reply))[:120]}")
                by_subscription[result] = watch
        self._n.connects += 1
        self.up = True
        self._on_state(True)
        log.info("PubSub %s: subscribed (%s)", redact(self._url), ", ".join(w.name for w in self._watches))
        while True:
            self._dispatch(await self._receive(conn), by_subscription)

    def _dispatch(self, message: dict[str, Any], by_subscription: dict[int, Watch]) -> None:
        params = message.get("params")
        if not isinstance(params, dict):
            return
        watch = by_subscription.get(params.get("subscription"))  # type: ignore[arg-type]
        if watch is not None:
            watch.handle(str(message.get("method")), params.get("result"))

    def stats(self) -> dict[str, Any]:
        """JSON-ready; the URL redacted."""
        n = self._n
        return {
            "url": redact(self._url),
            "up": self.up,
            "subscriptions": [w.name for w in self._watches],
            "subscriptions_made": n.connects,
            "reconnects": n.reconnects,
            "pongs": n.pongs,
            "bytes_received": n.bytes_received,
            "notifications": sum(w.notifications for w in self._watches),
            "notifications_by_subscription": {w.name: w.notifications for w in self._watches},
            "last_error": n.last_error,
        }


def _plain(value: Any) -> Any:
    """Config mappings (MappingProxyType) as plain JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
