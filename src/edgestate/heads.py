"""Read a request head as its bytes arrive and parse it once, with llhttp (httptools).

Every connection's requests are read here, whatever route they are for: the in-memory
answers, the WebSocket handshakes and the hand-off to Hypercorn all take the
:class:`Request` parsed here and never parse the head again. llhttp is the parser of
Node.js; in its strict mode it rejects what RFC 9112 says a server must reject (both
Content-Length and Transfer-Encoding, obs-fold, whitespace before a colon, bare CR or LF,
control characters), and it costs ~2 µs a head where h11 costs ~60 µs (measured in
docs/benchmarks.md, "Head parsing: llhttp vs h11"), which matters on the route every browser polls.

Reading waits on the socket (no polling): a half-open head costs its buffer and a
sleeping task until its deadline passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools
import trio

from .errors import BadRequest

_RECEIVE = 4096  # bytes per read: a head in more reads is rare; big reads fragment the heap
_VERSIONS = ("1.1", "1.0")


@dataclass(slots=True)
class Request:
    """One parsed request head.

    ``headers`` has lower-case names; a repeated header's values are joined with ", ".
    ``has_body``: a body follows the head (Content-Length > 0 or chunked).
    """

    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    keep_alive: bool
    upgrade: bool
    has_body: bool
    head_size: int

    def header_tokens(self, name: str) -> set[str]:
        """A comma-separated header as a set of lower-case tokens (e.g. Connection)."""
        return {token.strip().lower() for token in self.headers.get(name, "").split(",") if token.strip()}


class _Collector:
    """httptools callbacks: the pieces of one head."""

    __slots__ = ("url", "headers", "hosts", "complete", "message_complete")

    def __init__(self) -> None:
        self.hosts = 0
        self.url = b""
        self.headers: dict[str, str] = {}
        self.complete = False
        self.message_complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        self.hosts += key == "host"
        text = value.strip(b" \t").decode("latin-1")  # optional whitespace is not part of the value
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.message_complete = True


class HeadReader:
    """The request heads of one connection, read from its stream with bounds.

    Args:
        stream: the accepted connection.
        max_head: bytes a head may have (beyond: 431).

    ``buffer`` holds what was received and not yet consumed: after :meth:`next_request`
    it starts with the head just parsed (``head_size`` bytes), then whatever followed.
    """

    __slots__ = ("_stream", "_max", "buffer", "_parser", "_collector", "_scanned")

    def __init__(self, stream: trio.abc.ReceiveStream, max_head: int) -> None:
        self._stream = stream
        self._max = max_head
        self.buffer = bytearray()
        self._collector = _Collector()
        self._parser = httptools.HttpRequestParser(self._collector)
        self._scanned = 0

    async def next_request(self, *, idle_timeout: float, head_timeout: float) -> Request | None:
        """The next request head, or None when the peer left or stayed silent.

        Waits up to ``idle_timeout`` for the first byte (keep-alive), then up to
        ``head_timeout`` for the rest of the head.

        Raises:
            BadRequest: a malformed head (400), over the limit (431), an unsupported
                version (505), or a head not complete within ``head_timeout`` (408).
        """
        if not self.buffer:
            with trio.move_on_after(idle_timeout):
                if not await self._receive():
                    return None
            if not self.buffer:
                return None  # idle past the keep-alive timeout
        end = self._head_end()
        if end < 0:  # the usual head arrives in one read: no deadline to set up for it
            with trio.move_on_after(head_timeout) as waited:
                while (end := self._head_end()) < 0:
                    if len(self.buffer) > self._max:
                        raise BadRequest(431, "headers_too_large", f"request head over {self._max} bytes")
                    if not await self._receive():
                        return None
            if waited.cancelled_caught:
                raise BadRequest(408, "request_timeout", f"request head not complete within {head_timeout:g}s")
        if end > self._max:
            raise BadRequest(431, "headers_too_large", f"request head over {self._max} bytes")
        return self._parse(end)

    def consume(self, n: int) -> None:
        """Drop ``n`` bytes from the front of the buffer (a request that was answered)."""
        del self.buffer[:n]
        self._scanned = 0

    async def _receive(self) -> bool:
        data = await self._stream.receive_some(_RECEIVE)
        self.buffer += data
        return bool(data)

    def _head_end(self) -> int:
        """Length of the head in the buffer (through CRLFCRLF), -1 while incomplete."""
        at = self.buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if at < 0:
            self._scanned = len(self.buffer)
            return -1
        return at + 4

    def _parse(self, end: int) -> Request:
        # llhttp skips stray line breaks before a request line, h11 does not: whatever
        # starts with anything but a method is refused, so both read a request alike.
        if not self.buffer[:1].isalpha():
            raise BadRequest(400, "bad_request", "malformed request: the request line must start the request")
        collector = self._collector
        collector.url, collector.headers, collector.complete, collector.message_complete = b"", {}, False, False
        collector.hosts = 0
        upgrade = False
        try:
            self._parser.feed_data(bytes(self.buffer[:end]))
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as exc:
            raise BadRequest(400, "bad_request", f"malformed request: {_reason(exc)}") from None
        if not collector.complete:
            raise BadRequest(400, "bad_request", "malformed request head")
        version = self._parser.get_http_version()
        if version not in _VERSIONS:
            raise BadRequest(505, "http_version_not_supported", f"HTTP/{version} is not supported: use HTTP/1.1")
        headers = collector.headers
        if collector.hosts > 1 or (version == "1.1" and not collector.hosts):
            raise BadRequest(400, "bad_request", "a request needs exactly one Host header (HTTP/1.0: at most one)")
        target = collector.url.decode("latin-1")
        path, _, query = target.partition("?")
        method = self._parser.get_method().decode("latin-1")
        # One space between the three parts exactly (RFC 9112 3): llhttp would take more.
        line = self.buffer[: self.buffer.find(b"\r\n")]
        if line != f"{method} {target} HTTP/{version}".encode("latin-1"):
            raise BadRequest(400, "bad_request", "malformed request line")
        has_body = not collector.message_complete and not upgrade
        if upgrade or has_body or not self._parser.should_keep_alive():
            # The parser is mid-message or done with this connection: the next request
            # (if this one is answered here) starts a fresh one.
            self._parser = httptools.HttpRequestParser(collector)
        return Request(
            method=method,
            target=target,
            path=path,
            query=query,
            version=version,
            headers=headers,
            keep_alive=self._parser_keep_alive(version, headers),
            upgrade=upgrade,
            has_body=has_body,
            head_size=end,
        )

    @staticmethod
    def _parser_keep_alive(version: str, headers: dict[str, str]) -> bool:
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        return "keep-alive" in tokens if version == "1.0" else "close" not in tokens


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]
