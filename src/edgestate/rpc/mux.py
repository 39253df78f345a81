"""PubSub multiplexing: every client subscription with the same (method, params) shares
ONE upstream subscription and ONE subscription id.

:class:`Registry` is the sans-IO part: who is subscribed to what, which upstream
requests are owed, and which notification frame goes to whom. Because every client of
a subscription knows it by the same id, a notification is re-encoded once (upstream id
replaced by ours) and the same bytes are written to every subscriber (encode-once
fan-out, as /ws does).

:class:`Mux` owns the upstream PubSub WebSocket (:mod:`edgestate.wsconnect`): it sends
what the registry owes (subscribe on the first client, unsubscribe after the last),
routes notifications, and after a reconnect resubscribes everything and re-reads the
accounts and signatures once, so that clients miss nothing but the notifications that
fell in the gap (those are replaced by one fresh value).
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
import trio_websocket

from .. import wsframes
from ..config import redact
from ..wsconnect import backoff_delay, network_failure, open_websocket
from .policy import NOTIFICATIONS

log = logging.getLogger("edgestate.rpc.mux")

Execute = Callable[[str, list[Any]], Awaitable[Any]]
_MAX_UPSTREAM_MESSAGE = 16 << 20  # a programNotification can carry a large account
_BACKOFF_BASE, _BACKOFF_CAP = 0.5, 30.0
_CONNECT_TIMEOUT = 10.0
_MAX_REREADS = 64  # concurrent re-reads after a reconnect


class Conn(Protocol):
    """What the registry needs of a client connection."""

    def send_frame(self, frame: bytes) -> None:
        """Queue ``frame`` (never blocks; a slow client is closed by its own rules)."""


def _frame(obj: Any) -> bytes:
    return wsframes.text_frame(json.dumps(obj, separators=(",", ":")).encode())


def reply_frame(req_id: Any, result: Any) -> bytes:
    """A JSON-RPC result as a text frame."""
    return _frame({"jsonrpc": "2.0", "result": result, "id": req_id})


def error_frame(req_id: Any, code: int, message: str) -> bytes:
    """A JSON-RPC error as a text frame."""
    return _frame({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id})


class Sub:
    """One shared subscription: its clients (with a count each) and its upstream state."""

    __slots__ = ("id", "method", "params", "key", "conns", "upstream_id", "request_id", "waiting", "alive", "reread")

    def __init__(self, sub_id: int, method: str, params: list[Any], key: str) -> None:
        self.id, self.method, self.params, self.key = sub_id, method, params, key
        self.conns: dict[Conn, int] = {}
        self.upstream_id: int | None = None
        self.request_id: int | None = None  # a subscribe request in flight
        self.waiting: list[tuple[Conn, Any]] = []  # clients owed a reply once upstream confirms
        self.alive = True
        self.reread = False  # re-read once when the upstream confirms (after a reconnect)


class Registry:
    """The subscriptions of all clients and what is owed upstream (plain sync code).

    ``dirty`` holds the subscriptions whose upstream state differs from what they
    should be; :meth:`next_requests` turns them into JSON-RPC requests to send.
    """

    def __init__(self) -> None:
        self.by_key: dict[str, Sub] = {}
        self.by_id: dict[int, Sub] = {}
        self.by_upstream: dict[int, Sub] = {}
        self.requests: dict[int, tuple[str, Sub]] = {}  # upstream request id -> (kind, sub)
        self.dirty: dict[Sub, None] = {}  # insertion-ordered set
        self.connected = False
        self._next_sub = 1
        self._next_request = 1
        self.client_subscriptions = 0
        self.notifications = 0
        self.frames_written = 0
        self.resubscribed = 0

    # ---- clients -------------------------------------------------------------------

    def subscribe(self, conn: Conn, method: str, params: list[Any], req_id: Any) -> Sub:
        """Add ``conn`` to the subscription of (method, params); it gets the reply.

        The reply (the shared id) goes out now when the upstream subscription is up or
        the upstream is disconnected (it is resubscribed on reconnect); otherwise once
        the upstream confirms it.
        """
        key = json.dumps([method, params], sort_keys=True, separators=(",", ":"))
        sub = self.by_key.get(key)
        if sub is None:
            sub = Sub(self._next_sub, method, params, key)
            self._next_sub += 1
            self.by_key[key] = sub
            self.by_id[sub.id] = sub
            self.dirty[sub] = None
        sub.conns[conn] = sub.conns.get(conn, 0) + 1
        self.client_subscriptions += 1
        if sub.upstream_id is None and self.connected:
            sub.waiting.append((conn, req_id))
        else:
            conn.send_frame(reply_frame(req_id, sub.id))
        return sub

    def unsubscribe(self, conn: Conn, sub_id: Any, method: str) -> bool:
        """Remove one of ``conn``'s subscriptions ``sub_id``; False if it has none."""
        sub = self.by_id.get(sub_id) if isinstance(sub_id, int) and not isinstance(sub_id, bool) else None
        if sub is None or sub.method != method or conn not in sub.conns:
            return False
        self._release(sub, conn, 1)
        return True

    def drop(self, conn: Conn, subs: list[Sub]) -> None:
        """``conn`` is gone: release all of its subscriptions."""
        for sub in subs:
            count = sub.conns.get(conn, 0)
            if count:
                self._release(sub, conn, count)

    def _release(self, sub: Sub, conn: Conn, count: int) -> None:
        left = sub.conns[conn] - count
        self.client_subscriptions -= count
        if left > 0:
            sub.conns[conn] = left
            return
        del sub.conns[conn]
        sub.waiting = [(c, r) for c, r in sub.waiting if c is not conn]
        if not sub.conns:
            self._retire(sub)

    def _retire(self, sub: Sub) -> None:
        """The last client left: forget the subscription; owe an upstream unsubscribe."""
        sub.alive = False
        if self.by_key.get(sub.key) is sub:
            del self.by_key[sub.key]
        self.by_id.pop(sub.id, None)
        if sub.upstream_id is not None:
            self.dirty[sub] = None  # unsubscribe upstream
        else:
            self.dirty.pop(sub, None)  # a request in flight is undone when it is confirmed

    # ---- upstream ------------------------------------------------------------------

    def next_requests(self) -> list[dict[str, Any]]:
        """The requests to send now for every dirty subscription."""
        out = []
        for sub in self.dirty:
            if sub.alive and sub.upstream_id is None and sub.request_id is None:
                rid = self._request("subscribe", sub)
                out.append({"jsonrpc": "2.0", "id": rid, "method": sub.method, "params": sub.params})
            elif not sub.alive and sub.upstream_id is not None:
                rid = self._request("unsubscribe", sub)
                method = sub.method.replace("Subscribe", "Unsubscribe")
                out.append({"jsonrpc": "2.0", "id": rid, "method": method, "params": [sub.upstream_id]})
                self.by_upstream.pop(sub.upstream_id, None)
                sub.upstream_id = None
        self.dirty.clear()
        return out

    def _request(self, kind: str, sub: Sub) -> int:
        rid = self._next_request
        self._next_request += 1
        self.requests[rid] = (kind, sub)
        if kind == "subscribe":
            sub.request_id = rid
        return rid

    def on_reply(self, message: dict[str, Any]) -> Sub | None:
        """An upstream reply to one of our requests; the sub to re-read, if any."""
        rid = message.get("id")
        entry = self.requests.pop(rid, None) if isinstance(rid, int) else None
        if entry is None:
            return None
        kind, sub = entry
        if kind == "unsubscribe":
            return None
        sub.request_id = None
        result = message.get("result")
        if "error" in message or not isinstance(result, int) or isinstance(result, bool):
            raw = message.get("error")
            error: dict[str, Any] = raw if isinstance(raw, dict) else {}
            code = error["code"] if isinstance(error.get("code"), int) else -32603
            text = str(error.get("message", "upstream refused the subscription"))[:200]
            log.warning("upstream refused %s: %s", sub.method, text)
            for conn, req_id in sub.waiting:
                conn.send_frame(error_frame(req_id, code, text))
            sub.waiting = []
            self.client_subscriptions -= sum(sub.conns.values())
            sub.conns.clear()
            self._retire(sub)
            return None
        sub.upstream_id = result
        self.by_upstream[result] = sub
        if not sub.alive:  # every client left while the request was in flight
            self.dirty[sub] = None
            return None
        for conn, req_id in sub.waiting:
            conn.send_frame(reply_frame(req_id, sub.id))
        sub.waiting = []
        reread, sub.reread = sub.reread, False
        return sub if reread else None

    def on_notification(self, message: dict[str, Any]) -> Sub | None:
        """Fan an upstream notification out to its subscribers; the sub it was for."""
        params = message.get("params")
        if not isinstance(params, dict):
            return None
        upstream_id = params.get("subscription")
        if not isinstance(upstream_id, int):
            return None
        sub = self.by_upstream.get(upstream_id)
        if sub is None or not sub.alive or message.get("method") != NOTIFICATIONS.get(sub.method):
            return None
        self.notifications += 1
        self.publish(sub, params.get("result"))
        if sub.method == "signatureSubscribe" and isinstance(_value(params.get("result")), dict):
            # agave ends a signature subscription after its one final notification.
            self.by_upstream.pop(upstream_id, None)
            sub.upstream_id = None
            self._finish(sub)
        return sub

    def publish(self, sub: Sub, result: Any) -> None:
        """Encode one notification of ``sub`` once and write it to every subscriber."""
        frame = _frame({"jsonrpc": "2.0", "method": NOTIFICATIONS[sub.method],
                        "params": {"result": result, "subscription": sub.id}})
        for conn in list(sub.conns):
            conn.send_frame(frame)
        self.frames_written += len(sub.conns)

    def _finish(self, sub: Sub) -> None:
        """A one-shot subscription delivered its notification: it is over for everyone."""
        self.client_subscriptions -= sum(sub.conns.values())
        sub.conns.clear()
        self._retire(sub)

    def finish_with(self, sub: Sub, result: Any) -> None:
        """Deliver a final signatureNotification found by a re-read, then end ``sub``."""
        if not sub.alive:
            return
        self.publish(sub, result)
        self._finish(sub)

    def lost(self) -> None:
        """The upstream connection is gone: every live subscription is owed again."""
        self.connected = False
        self.by_upstream.clear()
        self.requests.clear()
        for sub in list(self.by_id.values()):
            if sub.upstream_id is not None:
                sub.reread = True  # notifications may be missed until it is back
            sub.upstream_id = None
            sub.request_id = None
            for conn, req_id in sub.waiting:  # they get the id now; it is resubscribed on reconnect
                conn.send_frame(reply_frame(req_id, sub.id))
            sub.waiting = []
            self.dirty[sub] = None
        # Dead subscriptions died with the connection upstream: nothing more to undo.
        self.dirty = {s: None for s in self.dirty if s.alive}

    def up(self) -> None:
        """A new upstream connection: everything alive is to be subscribed."""
        self.connected = True
        for sub in self.by_id.values():
            self.dirty[sub] = None
        self.resubscribed += len(self.by_id)

    def stats(self) -> dict[str, Any]:
        return {
            "upstream_connected": self.connected,
            "upstream_subscriptions": len(self.by_upstream),
            "shared_subscriptions": len(self.by_id),
            "client_subscriptions": self.client_subscriptions,
            "by_method": dict(collections.Counter(s.method for s in self.by_id.values())),
            "notifications_received": self.notifications,
            "notification_frames_written": self.frames_written,
            "resubscribed": self.resubscribed,
            "pending_requests": len(self.requests),
        }


def _value(result: Any) -> Any:
    return result.get("value") if isinstance(result, dict) else None


class Mux:
    """The upstream PubSub session behind all /rpc WebSocket clients.

    Args:
        url: the provider's PubSub URL (may carry a key: only ever logged redacted).
        read: ``read(method, params)`` through the pool, for the re-reads after a reconnect.
        on_account_change: called with a pubkey on every accountNotification (the proxy
            drops its cached reads of that account).
        request_timeout: an upstream reply to a (un)subscribe owed for longer than this
            means the session is broken: it is dropped and reconnected.
        ping_interval: keepalive of the upstream socket.
    """

    def __init__(self, url: str, *, read: Execute, on_account_change: Callable[[str], None],
                 request_timeout: float, ping_interval: float = 20.0) -> None:
        self.registry = Registry()
        self._url = url
        self._read = read
        self._on_account_change = on_account_change
        self._timeout = request_timeout
        self._ping_interval = ping_interval
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reread_limit = trio.CapacityLimiter(_MAX_REREADS)
        self._sent: collections.deque[tuple[float, int]] = collections.deque()  # (reply deadline, request id)
        self.connects = 0
        self.rereads = 0
        self.last_error: str | None = None

    # ---- called by client sessions (sync) ------------------------------------------

    def subscribe(self, conn: Conn, method: str, params: list[Any], req_id: Any) -> Sub:
        """See :meth:`Registry.subscribe`; wakes the upstream writer."""
        sub = self.registry.subscribe(conn, method, params, req_id)
        self._changed()
        return sub

    def unsubscribe(self, conn: Conn, sub_id: Any, method: str) -> bool:
        ok = self.registry.unsubscribe(conn, sub_id, method)
        self._changed()
        return ok

    def drop(self, conn: Conn, subs: list[Sub]) -> None:
        self.registry.drop(conn, subs)
        self._changed()

    def _changed(self) -> None:
        if self.registry.dirty:
            self._wake.set()

    # ---- the upstream session ------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (once there is a subscription), serve, reconnect after failures."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            failures = 0
            while True:
                while not self.registry.by_id:
                    await self._wait_change()
                try:
                    await self._session()
                    failures = 0
                except BaseException as exc:
                    error = network_failure(exc, (ValueError,))
                    if error is None:
                        raise
                    failures += 1
                    self.last_error = f"{type(error).__name__}: {redact(str(error))}"[:200]
                    log.warning("PubSub for /rpc: %s", self.last_error)
                finally:
                    self.registry.lost()
                await trio.sleep(backoff_delay(failures, _BACKOFF_BASE, _BACKOFF_CAP))

    async def _wait_change(self) -> None:
        await self._wake.wait()
        self._wake = trio.Event()

    async def _session(self) -> None:
        async with open_websocket(self._url, message_queue_size=64, max_message_size=_MAX_UPSTREAM_MESSAGE,
                                  ping_interval=self._ping_interval, connect_timeout=_CONNECT_TIMEOUT) as conn:
            self.connects += 1
            self.registry.up()
            log.info("PubSub for /rpc connected to %s (%d subscriptions)", redact(self._url), len(self.registry.by_id))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, conn)
                await self._reader(conn)
                nursery.cancel_scope.cancel()

    async def _writer(self, conn: trio_websocket.WebSocketConnection) -> None:
        sent = self._sent = collections.deque()
        while True:
            requests = self.registry.next_requests()
            if not requests:
                await self._wait_change()
                continue
            deadline = trio.current_time() + self._timeout
            for request in requests:
                with trio.fail_after(self._timeout):
                    await conn.send_message(json.dumps(request, separators=(",", ":")))
                sent.append((deadline, request["id"]))

    def _reply_deadline(self) -> float:
        """When the oldest unanswered request must have been answered."""
        sent = self._sent
        while sent and sent[0][1] not in self.registry.requests:
            sent.popleft()
        return sent[0][0] if sent else float("inf")

    async def _reader(self, conn: trio_websocket.WebSocketConnection) -> None:
        while True:
            with trio.move_on_at(self._reply_deadline()) as waited:
                text = await conn.get_message()
            if waited.cancelled_caught:
                raise trio.TooSlowError(f"no PubSub reply within {self._timeout:g}s")
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):
                raise ValueError("PubSub sent a message that is not JSON") from None
            if not isinstance(message, dict):
                continue
            if "method" in message:
                sub = self.registry.on_notification(message)
                if sub is not None and sub.method == "accountSubscribe":
                    self._on_account_change(sub.params[0])
            else:
                sub = self.registry.on_reply(message)
                if sub is not None and self._nursery is not None:
                    self._nursery.start_soon(self._reread, sub)
                if self.registry.dirty:
                    self._wake.set()

    async def _reread(self, sub: Sub) -> None:
        """After a reconnect: one fresh value for what may have changed in the gap."""
        async with self._reread_limit:
            try:
                if sub.method == "accountSubscribe":
                    self._on_account_change(sub.params[0])
                    config = dict(sub.params[1])
                    config.setdefault("encoding", "base64")
                    result = await self._read("getAccountInfo", [sub.params[0], config])
                    if sub.alive and isinstance(result, dict):
                        self.rereads += 1
                        self.registry.publish(sub, result)
                elif sub.method == "signatureSubscribe":
                    result = await self._read("getSignatureStatuses", [[sub.params[0]]])
                    status = (result.get("value") or [None])[0] if isinstance(result, dict) else None
                    if isinstance(status, dict) and _reached(status, sub.params[1].get("commitment", "finalized")):
                        self.rereads += 1
                        context = result.get("context")
                        self.registry.finish_with(sub, {"context": context, "value": {"err": status.get("err")}})
                        self._changed()
            except Exception as exc:  # a failed re-read costs one value, never the session
                log.info("re-read of %s after reconnect failed: %s", sub.method, type(exc).__name__)

    def stats(self) -> dict[str, Any]:
        return {**self.registry.stats(), "upstream_connects": self.connects, "rereads": self.rereads,
                "last_error": self.last_error}


_LEVELS = {"processed": 0, "confirmed": 1, "finalized": 2}


def _reached(status: dict[str, Any], commitment: str) -> bool:
    return _LEVELS.get(str(status.get("confirmationStatus")), -1) >= _LEVELS.get(commitment, 2)
