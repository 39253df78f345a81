"""The front door: what each new connection is, and the in-memory GETs served raw.

Every connection's first request head is *peeked* (MSG_PEEK), not read, so a connection
can still be handed to Hypercorn untouched. ``GET /ws`` goes to the WebSocket path. A
plain ``GET``/``HEAD`` of an in-memory route (/api/state, the lottery views, a price served
within its TTL) is answered here with bodies built once per change and sent in one write:
the route every browser and CDN polls skips h11, ASGI and the framework (measured: they
are ~95% of the cost of such a request, docs/benchmarks.md). Anything else, on the first
request or any later one of a keep-alive connection, is handed to Hypercorn at a request
boundary.
"""

from __future__ import annotations

import email.utils
import enum
import socket
import time
from collections.abc import Callable

import trio

from .http import FastPath

_MAX_HEAD = 8192
_KEEP_ALIVE = 5.0  # idle seconds before a raw keep-alive connection is closed
_HEAD_TIMEOUT = 10.0  # to receive a whole request head


class Kind(enum.Enum):
    WEBSOCKET = "ws"
    RPC_WS = "rpc-ws"  # GET /rpc with Upgrade: websocket (Solana PubSub, rpc/session.py)
    FAST = "fast"
    OTHER = "other"


async def peek_head(stream: trio.SocketStream, timeout: float) -> bytes | None:
    """The next request head (up to and including CRLFCRLF) without consuming it.

    None on EOF, timeout or a head over the limit (Hypercorn then answers / closes).
    """
    sock = stream.socket
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_readable(sock)
    with trio.move_on_after(_HEAD_TIMEOUT):
        while True:
            try:
                data = await sock.recv(_MAX_HEAD, socket.MSG_PEEK)
            except OSError:
                return None
            if not data:
                return None
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                return data[: end + 4]
            if len(data) >= _MAX_HEAD:
                return None
            # Head split across segments (rare): wait for more without spinning.
            await trio.sleep(0.005)
    return None


def classify(head: bytes | None, is_fast: Callable[[str], bool]) -> Kind:
    if head is None:
        return Kind.OTHER
    line_end = head.find(b"\r\n")
    parts = head[:line_end].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return Kind.OTHER
    method, target = parts[0], parts[1]
    if method == b"GET" and (target == b"/ws" or target.startswith(b"/ws?")):
        return Kind.WEBSOCKET
    if method == b"GET" and target.split(b"?")[0] == b"/rpc" and b"upgrade: websocket" in head.lower():
        return Kind.RPC_WS
    if method in (b"GET", b"HEAD") and parts[2] == b"HTTP/1.1" and is_fast(target.decode("latin-1")):
        return Kind.FAST
    return Kind.OTHER


def _parse_headers(head: bytes) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


class _Date:
    """The Date header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class RawHttp:
    """Serves the in-memory GETs of a connection until it asks for something else."""

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast
        self.is_fast = fast.is_fast
        self._date = _Date()
        self._idle: set[trio.CancelScope] = set()
        self._stopping = False

    def stop(self) -> None:
        """Shutdown: idle keep-alive connections close now, busy ones after their reply."""
        self._stopping = True
        for scope in list(self._idle):
            scope.cancel()

    async def serve(self, stream: trio.SocketStream, head: bytes) -> bool:
        """Answer fast requests; False when the connection should go to Hypercorn.

        ``head`` is the already peeked first request head. True means the connection
        was fully served and closed here.
        """
        peer = _peer(stream)
        try:
            while True:
                headers = _parse_headers(head)
                if headers is None or "content-length" in headers or "transfer-encoding" in headers:
                    return False  # unusual: let the full HTTP implementation answer
                method, target = head[: head.find(b"\r\n")].split(b" ")[:2]
                close = self._stopping or headers.get("connection", "").lower() == "close"
                await self._fast.prepare(method.decode(), target.decode("latin-1"))
                response = self._fast.raw_response(method.decode(), target.decode("latin-1"), headers, peer,
                                                   self._date.get(), close)
                if response is None:
                    return False  # not in memory: the app answers (nothing consumed yet)
                await stream.receive_some(len(head))  # consume exactly the head we answer
                await stream.send_all(response)
                if close:
                    break
                with trio.CancelScope() as idle:
                    self._idle.add(idle)
                    try:
                        next_head = await peek_head(stream, _KEEP_ALIVE)
                    finally:
                        self._idle.discard(idle)
                if idle.cancelled_caught or next_head is None:
                    break
                if classify(next_head, self.is_fast) is not Kind.FAST:
                    return False
                head = next_head
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await stream.aclose()
        return True


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"
