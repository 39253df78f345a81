"""The front door: every accepted connection, guarded, bounded, and sent where it belongs.

For each connection: admission (connections in all and per client address), then its
request heads, read once as bytes arrive and parsed once (heads.py), then dispatch:

- ``GET /ws`` → the WebSocket path (ws.py), with the parsed head and the bytes after it;
- the in-memory routes (views.py) → answered here in one write, keep-alive;
- anything else → Hypercorn (hypercorn_glue.py), with the bytes already read, unchanged.

A connection is a guarded unit: whatever goes wrong on it (a bug, RecursionError,
MemoryError, a hostile byte) is logged with its peer and closes that connection only.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import trio

from . import ws
from .config import Config
from .errors import BadRequest
from .heads import HeadReader, Request
from .hypercorn_glue import HypercornBridge
from .listen import peer_of
from .services import Services
from .views import HttpDate, Views, error_response, raw_response

log = logging.getLogger("edgestate.frontdoor")

_REFUSAL_LOG_EVERY = 60.0  # seconds between two log lines about refused connections

# An upgrade the front door owns: path -> accept(stream, request, rest bytes), which answers
# the handshake and returns the session to await (None: refused).
Session = Coroutine[Any, Any, None]
UpgradeHandler = Callable[[trio.SocketStream, Request, bytes], Awaitable[Session | None]]


def _refuse_now(stream: trio.SocketStream, response: bytes) -> None:
    """Best-effort answer without waiting (the socket is non-blocking): a refused peer gets no task time."""
    try:
        os.write(stream.socket.fileno(), response)
    except OSError:
        pass


class FrontDoor:
    """Admission, head reading and dispatch of the server's connections.

    Args:
        services: what the routes read from.
        views: the in-memory answers.
        bridge: Hypercorn, for everything else.
        capacity: connections this process may hold (config capped by open files).
    """

    def __init__(self, cfg: Config, services: Services, views: Views, bridge: HypercornBridge, capacity: int) -> None:
        self._cfg = cfg
        self._server = cfg.server
        self._services = services
        self._views = views
        self._bridge = bridge
        self._capacity = capacity
        self._date = HttpDate()
        self._per_client: collections.Counter[str] = collections.Counter()
        self._idle: set[trio.CancelScope] = set()
        self._stopping = False
        self._next_refusal_log = 0.0
        self.upgrades: dict[str, UpgradeHandler] = {"/ws": self._accept_ws}
        self.open = 0
        self.accepted = 0
        self.refused_full = 0
        self.refused_per_client = 0
        self.bad_requests = 0
        self.head_timeouts = 0
        self.failures = 0
        self.handed_to_app = 0

    def stats(self) -> dict[str, Any]:
        """The /stats ``connections`` section."""
        return {
            "open": self.open,
            "capacity": self._capacity,
            "accepted": self.accepted,
            "refused_full": self.refused_full,
            "refused_per_client": self.refused_per_client,
            "bad_requests": self.bad_requests,
            "head_timeouts": self.head_timeouts,
            "failures": self.failures,
            "handed_to_app": self.handed_to_app,
            "clients": len(self._per_client),
        }

    def stop(self) -> None:
        """Shutdown: idle keep-alive connections close now, busy ones after their reply."""
        self._stopping = True
        for scope in list(self._idle):
            scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection from accept to close; never raises for what a peer does."""
        host, port = peer_of(stream)
        if not self._admit(stream, host):
            await trio.aclose_forcefully(stream)
            return
        try:
            session = await self._serve(stream, host, port)
            if session is not None:  # an upgraded connection; the HTTP side's state is gone
                await session
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer left
        except Exception:  # one peer's problem, never the server's
            self.failures += 1
            log.exception("connection from %s:%d failed", host, port)
        except BaseException as exc:
            # solders' PanicException is a BaseException (STACK-NOTES): still one connection's.
            if type(exc).__name__ != "PanicException":
                raise
            self.failures += 1
            log.error("connection from %s:%d failed: %s", host, port, exc)
        finally:
            self.open -= 1
            self._per_client[host] -= 1
            if self._per_client[host] <= 0:
                del self._per_client[host]
            await trio.aclose_forcefully(stream)

    def _admit(self, stream: trio.SocketStream, host: str) -> bool:
        self.accepted += 1
        limit = self._server.max_connections_per_client
        why = ""
        if self.open >= self._capacity:
            self.refused_full += 1
            why = f"server full ({self._capacity} connections)"
            self._services.telemetry.refused("connection", "server_full")
        elif limit and self._per_client[host] >= limit and not self._views.limiter.is_trusted(host):
            self.refused_per_client += 1
            why = f"too many connections from {host} (limit {limit})"
            self._services.telemetry.refused("connection", "per_client")
        if why:
            log.debug("refused a connection from %s: 503 %s", host, why)
            _refuse_now(stream, error_response(503, "overloaded", why + "; try again later", date=self._date.get(),
                                               extra=[(b"retry-after", b"5"), *self._views.cors_headers(None)]))
            now = trio.current_time()
            if now >= self._next_refusal_log:
                self._next_refusal_log = now + _REFUSAL_LOG_EVERY
                log.warning("refusing new connections: %s (refused so far: %d full, %d per client)",
                            why, self.refused_full, self.refused_per_client)
            return False
        self.open += 1
        self._per_client[host] += 1
        return True

    async def _serve(self, stream: trio.SocketStream, host: str, port: int) -> Session | None:
        """Serve HTTP requests; the session to run when the connection was upgraded."""
        server = self._server
        reader = HeadReader(stream, server.max_header_bytes)
        idle_timeout = server.header_timeout  # a new connection gets the head timeout to start
        while True:
            request: Request | None = None
            with trio.CancelScope() as idle:
                self._idle.add(idle)
                try:
                    if self._stopping:
                        return None
                    request = await reader.next_request(idle_timeout=idle_timeout, head_timeout=server.header_timeout)
                except BadRequest as exc:
                    await self._refuse(stream, exc, host)
                    return None
                finally:
                    self._idle.discard(idle)
            if request is None:
                return None
            upgrade = self.upgrades.get(request.path)
            if upgrade is not None and request.method == "GET":
                return await upgrade(stream, request, bytes(reader.buffer[request.head_size:]))
            if request.upgrade and request.headers.get("upgrade", "").lower() == "websocket":
                await self._refuse(stream, BadRequest(404, "not_found", f"no WebSocket endpoint at {request.path}"),
                                   host)
                return None
            if self._in_memory(request):
                reader.consume(request.head_size)
                if not await self._answer(stream, request, host):
                    return None
                idle_timeout = server.keepalive_timeout
                continue
            # Hypercorn from here on, with the bytes as they came (a request answered with
            # "Connection: close" hands over only its own head: nothing pipelined behind it).
            self.handed_to_app += 1
            close_after = not request.keep_alive and not request.has_body
            already_read = bytes(reader.buffer[: request.head_size] if close_after else reader.buffer)
            await self._bridge.serve(stream, already_read)
            return None

    def _in_memory(self, request: Request) -> bool:
        return (
            not request.query
            and not request.has_body
            and not request.upgrade
            and request.target.startswith("/")
            and self._views.is_memory_route(request.path)
        )

    async def _answer(self, stream: trio.SocketStream, request: Request, host: str) -> bool:
        """Answer an in-memory route; False when the connection should close."""
        status, body, headers = await self._views.answer(request.method, request.path, request.headers, host)
        close = self._stopping or not request.keep_alive
        response = raw_response(status, body, headers, date=self._date.get(), close=close,
                                head_only=request.method == "HEAD")
        await self._send(stream, response)
        return not close

    async def _send(self, stream: trio.SocketStream, data: bytes) -> None:
        # Most answers fit the socket's buffer: one non-blocking write, no deadline to set
        # up (measured: the route every browser polls); the rest waits with one.
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:
            raise trio.BrokenResourceError("the peer is gone") from None
        if sent == len(data):
            return
        with trio.move_on_after(self._server.body_timeout) as waited:
            await stream.send_all(memoryview(data)[sent:])
        if waited.cancelled_caught:
            raise trio.BrokenResourceError("client took no data")

    async def _refuse(self, stream: trio.SocketStream, exc: BadRequest, host: str) -> None:
        if exc.status == 408:
            self.head_timeouts += 1
        else:
            self.bad_requests += 1
        self._services.telemetry.refused("http", str(exc.status))
        log.debug("refused a request from %s: %d %s", host, exc.status, exc.message)
        await self._send(stream, error_response(exc.status, exc.code, exc.message, date=self._date.get(),
                                                extra=self._views.cors_headers(None)))

    async def _accept_ws(self, stream: trio.SocketStream, request: Request, rest: bytes) -> Session | None:
        return await ws.accept_ws(stream, request, rest, self._services.hub, self._cfg)
