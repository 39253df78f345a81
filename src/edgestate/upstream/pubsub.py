"""The provider's PubSub WebSocket: one account subscription, kept alive.

``accountSubscribe`` pushes every change of the account (here: the lottery pot) the moment
it lands on chain. Subscriptions die with the socket, so each reconnect subscribes again
and calls ``on_subscribed`` so the owner can read the value once (nothing changed while
disconnected is missed). Reconnects back off exponentially with full jitter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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


class PubSubError(Exception):
    """A PubSub protocol problem (bad reply, subscription refused)."""


class AccountSubscription:
    """Keeps ``accountSubscribe(pubkey)`` open on ``url`` and reports each change.

    Args:
        url: the provider's PubSub URL (ws:// or wss://; may carry an API key).
        pubkey: the account to watch.
        commitment: commitment level of the notifications.
        on_change: ``on_change(lamports, slot)`` for every notification (sync, fast).
        on_state: ``on_state(up)`` when the subscription comes up or goes down.
        ping_interval: keepalive pings; a missing pong for this long drops the socket.
    """

    def __init__(
        self,
        url: str,
        pubkey: str,
        *,
        commitment: str,
        on_change: Callable[[int, int], None],
        on_state: Callable[[bool], None],
        ping_interval: float = 20.0,
    ) -> None:
        self._url = url
        self._pubkey = pubkey
        self._commitment = commitment
        self._on_change = on_change
        self._on_state = on_state
        self._ping_interval = ping_interval
        self.up = False
        self.connects = 0
        self.reconnects = 0
        self.notifications = 0
        self.last_error: str | None = None

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
                self.last_error = f"{type(error).__name__}: {redact(describe(error))}"[:200]
                # Once per outage; the reconnects after it are counted (/stats, /metrics).
                (log.warning if failures == 1 else log.debug)("PubSub %s: %s", redact(self._url), self.last_error)
            finally:
                if self.up:
                    self.up = False
                    self._on_state(False)
            self.reconnects += 1
            await trio.sleep(backoff_delay(failures, _BACKOFF_BASE, _BACKOFF_CAP))

    async def _session(self) -> None:
        async with open_websocket(
            self._url, message_queue_size=16, max_message_size=_MAX_MESSAGE, ping_interval=self._ping_interval,
            connect_timeout=_CONNECT_TIMEOUT,
        ) as conn:
            await self._subscribed(conn)

    async def _subscribed(self, conn: trio_websocket.WebSocketConnection) -> None:
        request = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "accountSubscribe",
            "params": [self._pubkey, {"encoding": "base64", "commitment": self._commitment}],
        }
        await conn.send_message(json.dumps(request))
        with trio.fail_after(_CONNECT_TIMEOUT):
            while True:
                reply = _loads(await conn.get_message())
                if reply.get("id") == 1:
                    break
        if "error" in reply or not isinstance(reply.get("result"), int):
            raise PubSubError(f"accountSubscribe refused: {str(reply.get('error', reply))[:120]}")
        subscription = reply["result"]
        self.connects += 1
        self.up = True
        self._on_state(True)
        log.info("PubSub %s: subscribed to %s", redact(self._url), self._pubkey)
        while True:
            message = _loads(await conn.get_message())
            if message.get("method") != "accountNotification":
                continue
            params = message.get("params") or {}
            if params.get("subscription") != subscription:
                continue
            lamports, slot = _parse_notification(params)
            self.notifications += 1
            self._on_change(lamports, slot)

    def stats(self) -> dict[str, Any]:
        return {
            "url": redact(self._url),
            "up": self.up,
            "subscriptions_made": self.connects,
            "reconnects": self.reconnects,
            "notifications": self.notifications,
            "last_error": self.last_error,
        }


def _loads(text: str | bytes) -> dict[str, Any]:
    return json_object(text, PubSubError, "PubSub")


def _parse_notification(params: dict[str, Any]) -> tuple[int, int]:
    try:
        result = params["result"]
        slot = int(result["context"]["slot"])
        value = result["value"]
        lamports = 0 if value is None else int(value["lamports"])
    except (KeyError, TypeError, ValueError):
        raise PubSubError("malformed accountNotification") from None
    return lamports, slot
