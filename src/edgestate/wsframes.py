"""The few pieces of RFC 6455 the /ws endpoint needs, with bounded buffers.

Server frames are never masked, so a broadcast frame is encoded once and the same bytes
go to every client. Client frames are parsed incrementally; a message larger than the
limit is skipped without being buffered.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def text_frame(payload: bytes) -> bytes:
    return encode_frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])


PING_FRAME = encode_frame(OP_PING)


@dataclass(frozen=True, slots=True)
class Message:
    """A complete data message (``text`` False for binary)."""

    data: bytes
    text: bool


@dataclass(frozen=True, slots=True)
class Control:
    """A control frame: close, ping or pong."""

    opcode: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class TooBig:
    """A message over the size limit was skipped."""

    size: int


class ProtocolError(Exception):
    """The peer broke RFC 6455; the connection must close with 1002."""


class FrameParser:
    """Incremental parser of client (masked) frames.

    ``feed(data)`` returns the events completed by ``data``. At most one frame header and
    ``max_message_size`` bytes of one message are held at a time.
    """

    __slots__ = ("_buf", "_max", "_parts", "_size", "_opcode", "_skip", "_skipping")

    def __init__(self, max_message_size: int) -> None:
        self._buf = bytearray()
        self._max = max_message_size
        self._parts: list[bytes] = []
        self._size = 0
        self._opcode = 0  # opcode of the fragmented message in progress (0: none)
        self._skip = 0  # payload bytes of an oversized frame still to discard
        self._skipping = False  # discarding the rest of an oversized message

    def feed(self, data: bytes) -> list[Message | Control | TooBig]:
        events: list[Message | Control | TooBig] = []
        self._buf += data
        while True:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return events
            event = self._next_frame()
            if event is None:
                return events
            if not isinstance(event, bool):  # True: a frame consumed with nothing to report yet
                events.append(event)

    def _next_frame(self) -> Message | Control | TooBig | bool | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin, opcode, masked, length = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        if b0 & 0x70:
            raise ProtocolError("reserved bits set (no extension was negotiated)")
        if not masked:
            raise ProtocolError("client frames must be masked")
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
        if opcode >= OP_CLOSE:
            if length > 125 or not fin:
                raise ProtocolError("control frames must be final and at most 125 bytes")
        elif opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        elif (opcode == OP_CONT) != bool(self._opcode or self._skipping):
            raise ProtocolError("unexpected continuation frame" if opcode == OP_CONT else "expected a continuation frame")

        if opcode < OP_CLOSE and (self._skipping or self._size + length > self._max):
            # Oversized: drop this payload unread, and the rest of its message.
            if len(buf) < pos + 4:
                return None
            del buf[: pos + 4]
            self._skip = length
            size = self._size + length
            self._parts, self._size = [], 0
            was_skipping, self._skipping = self._skipping, not fin
            self._opcode = 0
            return True if was_skipping else TooBig(size)

        end = pos + 4 + length
        if len(buf) < end:
            return None
        mask = bytes(buf[pos : pos + 4])
        payload = _unmask(bytes(buf[pos + 4 : end]), mask)
        del buf[:end]
        if opcode >= OP_CLOSE:
            return Control(opcode, payload)
        self._parts.append(payload)
        self._size += length
        if opcode != OP_CONT:
            self._opcode = opcode
        if not fin:
            return True
        message = Message(b"".join(self._parts), self._opcode == OP_TEXT)
        self._parts, self._size, self._opcode = [], 0, 0
        return message


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR with the 4-byte mask through one big int: fast enough for small frames.
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def parse_close(payload: bytes) -> int:
    """The code of a close frame (1005 when the peer sent none)."""
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
