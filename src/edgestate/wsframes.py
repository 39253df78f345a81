"""RFC 6455 framing for the server side: the encode-once encoder, close codes, and a
strict, bounded parser of client frames.

Server frames are never masked, so a broadcast frame is encoded once and the same bytes
go to every client. Client frames are parsed incrementally: a payload is unmasked and
(for text) UTF-8 validated as its bytes arrive, so an invalid message fails at the
first bad byte, mid-frame, without waiting for the rest. A message over the byte or
fragment limit is skipped without being buffered. Nothing the peer sends makes the
parser raise: a protocol violation is returned as a :class:`Failure` event carrying the
close code to answer (1002, or 1007 for bad UTF-8).

Why our own parser and not wsproto's frame layer (``bench/ws_memory.py``): an idle
``FrameParser`` costs a few hundred bytes, a ``wsproto`` frame layer several times
that, and every idle /ws client pays it. wsproto is the oracle of our property tests
(``tests/test_wsframes_props.py``) instead.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from dataclasses import dataclass

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never sent: what a close frame without a code means
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013

#: Fragments of one message accepted by default before it counts as too big.
MAX_FRAGMENTS = 32

_MAX_CONTROL_PAYLOAD = 125
_MAX_REASON_BYTES = _MAX_CONTROL_PAYLOAD - 2


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def switching_protocols(key: str) -> bytes:
    """The 101 answer accepting an upgrade with Sec-WebSocket-Key ``key``."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: " + accept_key(key).encode() + b"\r\n\r\n"
    )


def encode_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One unmasked server frame (final unless ``fin`` is False)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    return head + payload


def text_frame(payload: bytes) -> bytes:
    """A final text frame of ``payload`` (UTF-8 bytes)."""
    return encode_frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; ``reason`` is cut to fit a control frame, on a character boundary."""
    raw = reason.encode()[:_MAX_REASON_BYTES].decode("utf-8", "ignore").encode()
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + raw)


PING_FRAME = encode_frame(OP_PING)


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 7.4, IANA registry).

    1000-1003 and 1007-1014 are assigned for use on the wire; 1004 is reserved, 1005,
    1006 and 1015 are never sent; the rest of 1000-2999 is unassigned; 3000-4999 belong
    to libraries and applications.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> int:
    """The code of a close frame, without validation (1005 when the peer sent none)."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NO_STATUS


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message (``text`` False for binary); text is valid UTF-8."""

    data: bytes
    text: bool


@dataclass(frozen=True, slots=True)
class Control:
    """A ping or pong frame."""

    opcode: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """A valid close frame: its code (1005 when it had none) and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class TooBig:
    """A message over the byte or fragment limit is being skipped; ``size`` is the
    payload length known when it went over."""

    size: int


@dataclass(frozen=True, slots=True)
class Failure:
    """The peer broke RFC 6455: close with ``code`` (1002, or 1007 for invalid UTF-8)
    and drop the connection. Always the last event of a parser."""

    code: int
    reason: str


Event = Message | Control | Close | TooBig | Failure


class _Fail(Exception):
    def __init__(self, reason: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


def _close_event(payload: bytes) -> Close:
    # A 1-byte payload or a code peers may not send: 1002; a reason that is not UTF-8: 1007.
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) == 1:
        raise _Fail("close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not valid_close_code(code):
        raise _Fail(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _Fail("close reason is not valid UTF-8", CLOSE_INVALID_DATA) from None
    return Close(code, reason)


_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class FrameParser:
    """Incremental parser of client (masked) frames.

    ``feed(data)`` returns the events completed by ``data``, in order. It holds at most
    one frame header, one control payload and ``max_message_size`` bytes of one
    message; a message over ``max_message_size`` bytes or ``max_fragments`` frames is
    reported once as :class:`TooBig` and its payload discarded unread. ``frames``
    counts every frame header parsed (data, continuation and control frames alike),
    for the caller's rate limit. After a :class:`Failure` the parser takes no more input.

    Args:
        max_message_size: payload bytes of one message, all its fragments together.
        max_fragments: frames of one message.
    """

    __slots__ = (
        "frames",
        "_buf",
        "_max",
        "_max_fragments",
        "_left",
        "_fin",
        "_op",
        "_mask",
        "_mpos",
        "_ctl",
        "_msg_op",
        "_parts",
        "_size",
        "_count",
        "_utf8",
        "_skipping",
        "_failed",
    )

    def __init__(self, max_message_size: int, *, max_fragments: int = MAX_FRAGMENTS) -> None:
        self.frames = 0
        self._buf = bytearray()
        self._max = max_message_size
        self._max_fragments = max_fragments
        self._left = -1  # payload bytes of the current frame still to come; -1: between frames
        self._fin = False
        self._op = 0  # opcode of the current frame
        self._mask = b""
        self._mpos = 0  # position in the mask of the next payload byte
        self._ctl = b""  # control payload so far (at most 125 bytes)
        self._msg_op = 0  # opcode of the message in progress; 0: none
        self._parts: list[bytes] | None = None  # only while a message is open: idle parsers stay small
        self._size = 0
        self._count = 0  # frames of the message in progress
        self._utf8: codecs.IncrementalDecoder | None = None  # only while a text message is open
        self._skipping = False  # the message in progress went over a limit
        self._failed = False

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; the events it completed (a :class:`Failure` ends the list)."""
        events: list[Event] = []
        if self._failed:
            return events
        buf = self._buf
        buf += data
        try:
            while True:
                if self._left < 0:
                    if not self._header(events):
                        break
                elif self._left:
                    take = min(self._left, len(buf))
                    if not take:
                        break
                    chunk = bytes(buf[:take])
                    del buf[:take]
                    self._left -= take
                    self._payload(chunk)
                if self._left == 0:
                    self._end_frame(events)
        except _Fail as exc:
            self._failed = True
            buf.clear()
            self._parts, self._utf8, self._ctl = None, None, b""
            events.append(Failure(exc.code, str(exc)))
        return events

    def _header(self, events: list[Event]) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        fin, opcode, length = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        # Fail on what the first two bytes already show, before waiting for more.
        if b0 & 0x70:
            raise _Fail("reserved bits set (no extension was negotiated)")
        if opcode not in _KNOWN_OPCODES:
            raise _Fail(f"unknown opcode {opcode:#x}")
        if not b1 & 0x80:
            raise _Fail("client frames must be masked")
        control = opcode >= OP_CLOSE
        if control and (not fin or length > _MAX_CONTROL_PAYLOAD):
            raise _Fail("control frames must be final and at most 125 bytes")
        if opcode == OP_CONT and not self._msg_op:
            raise _Fail("continuation frame without a message to continue")
        if not control and opcode != OP_CONT and self._msg_op:
            raise _Fail("new data frame inside a fragmented message (expected a continuation)")
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return False
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
            if length < 126:
                raise _Fail("payload length not minimally encoded")
        elif length == 127:
            if len(buf) < 10:
                return False
            (length,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
            if length >> 63:
                raise _Fail("64-bit payload length with the most significant bit set")
            if length < 1 << 16:
                raise _Fail("payload length not minimally encoded")
        if len(buf) < pos + 4:
            return False
        self._mask = bytes(buf[pos : pos + 4])
        del buf[: pos + 4]
        self.frames += 1
        self._fin, self._op, self._left, self._mpos = fin, opcode, length, 0
        if control:
            self._ctl = b""
            return True
        if opcode != OP_CONT:
            self._msg_op, self._size, self._count, self._parts = opcode, 0, 0, []
            self._utf8 = _utf8_decoder() if opcode == OP_TEXT else None
        self._count += 1
        if not self._skipping and (self._size + length > self._max or self._count > self._max_fragments):
            # Over a limit: report once, drop what was kept, skip the rest unread.
            events.append(TooBig(self._size + length))
            self._skipping = True
            self._parts, self._utf8 = None, None
        self._size += length
        return True

    def _payload(self, chunk: bytes) -> None:
        if self._op < OP_CLOSE and self._skipping:
            return
        n = len(chunk)
        mpos = self._mpos
        self._mpos = (mpos + n) & 3
        mask = self._mask[mpos:] + self._mask[:mpos]
        chunk = _unmask(chunk, mask)
        if self._op >= OP_CLOSE:
            self._ctl += chunk
            return
        if self._utf8 is not None:
            try:
                self._utf8.decode(chunk)
            except UnicodeDecodeError:
                raise _Fail("text message is not valid UTF-8", CLOSE_INVALID_DATA) from None
        if self._parts is not None:
            self._parts.append(chunk)

    def _end_frame(self, events: list[Event]) -> None:
        self._left = -1
        op = self._op
        if op >= OP_CLOSE:
            payload, self._ctl = self._ctl, b""
            events.append(_close_event(payload) if op == OP_CLOSE else Control(op, payload))
            return
        if not self._fin:
            return
        if not self._skipping:
            if self._utf8 is not None:
                try:
                    self._utf8.decode(b"", True)
                except UnicodeDecodeError:
                    raise _Fail("text message ends inside a UTF-8 sequence", CLOSE_INVALID_DATA) from None
            parts = self._parts or []
            events.append(Message(parts[0] if len(parts) == 1 else b"".join(parts), self._msg_op == OP_TEXT))
        self._msg_op, self._size, self._count, self._skipping = 0, 0, 0, False
        self._parts, self._utf8 = None, None


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR with the 4-byte mask through one big int: C speed, no per-byte Python loop.
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
