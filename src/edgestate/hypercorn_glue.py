"""The only module that touches Hypercorn's internals (tests/test_hypercorn_glue.py pins them).

Hypercorn serves what the front door does not answer itself (frontdoor.py), on a
connection the front door accepted and already read the first request head of. What
``hypercorn.trio.serve`` does, minus its accept loop: the ASGI lifespan, and its
``TCPServer`` protocol per connection, run inside the front door's guarded task so that
anything that goes wrong there costs that connection only.

Internals used: ``hypercorn.trio.lifespan.Lifespan``, ``hypercorn.trio.tcp_server.TCPServer``,
``hypercorn.trio.worker_context.WorkerContext`` (``terminated``), ``hypercorn.utils.wrap_app``,
``hypercorn.typing.ConnectionState``; for the simulator's idle timer,
``hypercorn.protocol.ws_stream.WSStream._accept`` and its ``connection``/``client``.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Generator
from typing import Any

import hypercorn.config
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from .config import ServerConfig


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream that first replays the bytes the front door already read.

    Sends get a deadline of their own: Hypercorn shields its writes from cancellation
    (STACK-NOTES), so a client that stops reading would otherwise hold its task forever.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes, send_timeout: float) -> None:
        self._stream = stream
        self._prefix = prefix
        self._send_timeout = send_timeout
        self.socket = stream.socket  # Hypercorn reads the peer and local addresses from it

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            with trio.fail_after(self._send_timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise trio.BrokenResourceError(f"client took no data for {self._send_timeout:g}s") from None

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    # Hypercorn closes a finished connection from inside the app's task, in a scope that
    # quart-trio has just cancelled: a checkpoint here abandoned the close, and the
    # connection stayed open until a timeout (or forever). So these two never checkpoint.
    async def send_eof(self) -> None:  # noqa: ASYNC910
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:  # noqa: ASYNC910
        self.socket.close()


class HypercornBridge:
    """Hypercorn's HTTP/1.1 protocol and the app's lifespan, for handed-over connections."""

    def __init__(self, app: Any, server: ServerConfig, *, send_timeout: float) -> None:
        hcfg = hypercorn.config.Config()
        hcfg.accesslog = None
        hcfg.errorlog = logging.getLogger("hypercorn.error")
        hcfg.graceful_timeout = server.graceful_timeout
        hcfg.keep_alive_timeout = server.keepalive_timeout
        # Hypercorn's per-read timeout bounds the time between body bytes, and keep-alive
        # idling too should its idle timer not fire (tests/test_edge.py checks both).
        hcfg.read_timeout = math.ceil(max(server.body_timeout, server.keepalive_timeout))
        hcfg.h11_max_incomplete_size = server.max_header_bytes
        hcfg.websocket_max_message_size = 65536  # WebSockets never reach it; bound anyway
        self._hcfg = hcfg
        self._send_timeout = send_timeout
        self._app = wrap_app(app, hcfg.wsgi_max_body_size, "asgi")
        self._context = WorkerContext(None)
        self._lifespan_state: dict[str, Any] = {}
        self._stop = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The app's lifespan: started, then shut down after :meth:`stop`."""
        lifespan = Lifespan(self._app, self._hcfg, self._lifespan_state)
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            task_status.started()
            await self._stop.wait()
            await lifespan.wait_for_shutdown()
            nursery.cancel_scope.cancel(reason="lifespan over")

    async def serve(self, stream: trio.SocketStream, already_read: bytes) -> None:
        """Serve a connection from the request whose bytes start ``already_read``."""
        wrapped = PrefixedStream(stream, already_read, self._send_timeout)
        # TCPServer is annotated for SSLStream; its non-TLS path handles any stream with .socket.
        server = TCPServer(self._app, self._hcfg, self._context, ConnectionState(self._lifespan_state.copy()),
                           wrapped)  # type: ignore[arg-type]
        await server.run()

    async def drain(self) -> None:
        """Shutdown: idle keep-alive connections close now, busy ones after their response."""
        await self._context.terminated.set()

    def stop(self) -> None:
        """End the lifespan (after the connections drained)."""
        self._stop.set()


class _PingSpy:
    """A wsproto Connection that reports the Ping events it hands out."""

    def __init__(self, inner: Any, client: tuple[Any, ...], report: Callable[[tuple[Any, ...]], None]) -> None:
        self._inner = inner
        self._client = client
        self._report = report

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def events(self) -> Generator[Any, None, None]:
        from wsproto.events import Ping

        for event in self._inner.events():
            if isinstance(event, Ping):
                self._report(self._client)
            yield event


def report_websocket_pings(report: Callable[[tuple[Any, ...]], None]) -> bool:
    """Call ``report(client_address)`` for each WebSocket ping Hypercorn answers itself.

    ASGI does not show pings to the app; the simulator needs them (a provider's idle
    timer counts them). Patches Hypercorn's WebSocket stream class for the process;
    False when this Hypercorn's internals differ (nothing patched).
    """
    try:
        from hypercorn.protocol.ws_stream import WSStream

        original = WSStream._accept
    except (ImportError, AttributeError):
        return False

    async def _accept(self: Any, message: Any) -> None:
        await original(self, message)
        connection = getattr(self, "connection", None)
        client = tuple(self.client) if getattr(self, "client", None) else None
        if connection is not None and client is not None and not isinstance(connection, _PingSpy):
            self.connection = _PingSpy(connection, client, report)

    WSStream._accept = _accept  # type: ignore[method-assign]
    return True
