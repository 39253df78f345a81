"""Property tests of the frame layer: our parser against wsproto's as the oracle, the
encoder round trip, and arbitrary bytes never breaking the parser or its bounds."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameDecoder, FrameProtocol, Opcode, ParseFailed

from edgestate import wsframes
from edgestate.wsframes import Close, Control, Failure, FrameParser, Message, TooBig

BOUNDED = settings(max_examples=300, deadline=None)

# 1014 (Bad Gateway) is assigned by IANA and accepted by us; wsproto 1.x predates it.
CLOSE_CODES = st.one_of(
    st.sampled_from([0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1013, 1015, 1016, 2999, 3000,
                     4999, 5000, 65535]),
    st.integers(0, 65535),
).filter(lambda code: code != 1014)

# Payloads around the 16-bit length boundary, made from a short random pattern (drawing
# 64 KiB of random bytes per example would take most of the test's time).
LARGE = st.tuples(st.binary(min_size=1, max_size=16), st.integers(65_000, 70_000)).map(
    lambda t: (t[0] * (t[1] // len(t[0]) + 1))[: t[1]]
)


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    wide: int = 0  # 0: minimal length encoding; 2 or 8: force that many length bytes


def encode(frame: Frame, mask: bytes) -> bytes:
    n = len(frame.payload)
    b0 = (0x80 if frame.fin else 0) | frame.rsv << 4 | frame.opcode
    m = 0x80 if frame.masked else 0
    if frame.wide == 8 or (not frame.wide and n >= 1 << 16):
        head = struct.pack("!BBQ", b0, m | 127, n)
    elif frame.wide == 2 or (not frame.wide and n >= 126):
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BB", b0, m | n)
    if not frame.masked:
        return head + frame.payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(frame.payload))


@st.composite
def close_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "one byte", "code", "code", "code"]))
    if kind == "empty":
        return b""
    if kind == "one byte":
        return draw(st.binary(min_size=1, max_size=1))
    reason = draw(st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=10)))
    return (struct.pack("!H", draw(CLOSE_CODES)) + reason)[:125]


@st.composite
def streams(draw: st.DrawFn) -> list[Frame]:
    """Mostly well-formed conversations, then a few mutations of any header field."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["text", "text", "binary", "ping", "pong", "close"]))
        if kind in ("text", "binary"):
            data = draw(st.text(max_size=40).map(str.encode)) if kind == "text" else draw(st.binary(max_size=40))
            if kind == "text" and draw(st.integers(0, 5)) == 0:  # sometimes not UTF-8
                at = draw(st.integers(0, len(data)))
                data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
            cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            for i, piece in enumerate(pieces):
                opcode = (wsframes.OP_TEXT if kind == "text" else wsframes.OP_BINARY) if i == 0 else wsframes.OP_CONT
                frames.append(Frame(opcode, piece, fin=i == len(pieces) - 1))
                if i < len(pieces) - 1 and draw(st.integers(0, 3)) == 0:
                    frames.append(Frame(wsframes.OP_PING, draw(st.binary(max_size=8))))
        elif kind == "close":
            frames.append(Frame(wsframes.OP_CLOSE, draw(close_payloads())))
        else:
            opcode = wsframes.OP_PING if kind == "ping" else wsframes.OP_PONG
            frames.append(Frame(opcode, draw(st.binary(max_size=125))))
    for _ in range(draw(st.integers(0, 2))):
        frame = draw(st.sampled_from(frames))
        mutation = draw(st.sampled_from(["fin", "opcode", "rsv", "mask", "wide", "long control"]))
        if mutation == "fin":
            frame.fin = not frame.fin
        elif mutation == "opcode":
            frame.opcode = draw(st.integers(0, 15))
        elif mutation == "rsv":
            frame.rsv = draw(st.integers(1, 7))
        elif mutation == "mask":
            frame.masked = False
        elif mutation == "wide":
            frame.wide = draw(st.sampled_from([2, 8]))
        else:
            frame.payload = draw(st.binary(min_size=126, max_size=200))
    return frames


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def ours(chunks: list[bytes]) -> list[object]:
    parser = FrameParser(1 << 30, max_fragments=1 << 30)
    events: list[object] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return [Failure(e.code, "") if isinstance(e, Failure) else e for e in events]


def oracle(chunks: list[bytes]) -> list[object]:
    """The same stream through wsproto's server-side frame layer, as our events."""
    proto = FrameProtocol(client=False, extensions=[])
    events: list[object] = []
    parts: list[bytes] = []
    try:
        for chunk in chunks:
            proto.receive_bytes(chunk)
            for frame in proto.received_frames():
                if frame.opcode is Opcode.CLOSE:
                    code, reason = frame.payload
                    events.append(Close(int(code), reason))
                elif frame.opcode in (Opcode.PING, Opcode.PONG):
                    events.append(Control(int(frame.opcode), bytes(frame.payload)))
                else:
                    payload = frame.payload
                    parts.append(payload.encode() if isinstance(payload, str) else bytes(payload))
                    if frame.message_finished:
                        events.append(Message(b"".join(parts), frame.opcode is Opcode.TEXT))
                        parts = []
    except ParseFailed as exc:
        events.append(Failure(int(exc.code), ""))
    return events


def until_close(events: list[object]) -> list[object]:
    for i, event in enumerate(events):
        if isinstance(event, (Close, Failure)):
            return events[: i + 1]
    return events


@BOUNDED
@given(streams(), st.binary(min_size=4, max_size=4), st.lists(st.integers(0, 2000), max_size=8),
       st.lists(st.integers(0, 2000), max_size=8))
def test_parser_agrees_with_wsproto(frames, mask, our_cuts, their_cuts):
    data = b"".join(encode(f, mask) for f in frames)
    assert until_close(ours(chunked(data, our_cuts))) == until_close(oracle(chunked(data, their_cuts)))


@BOUNDED
@given(st.sampled_from([wsframes.OP_TEXT, wsframes.OP_BINARY, wsframes.OP_CONT, wsframes.OP_CLOSE,
                        wsframes.OP_PING, wsframes.OP_PONG]),
       st.one_of(st.binary(max_size=300), LARGE), st.booleans())
def test_encoder_roundtrip(opcode, payload, fin):
    if opcode >= wsframes.OP_CLOSE:
        payload, fin = payload[:125], True
    frame = wsframes.encode_frame(opcode, payload, fin=fin)
    # wsproto's frame decoder, as a client, reads our (unmasked) server frame back.
    decoder = FrameDecoder(client=True, extensions=[])
    decoder.receive_bytes(frame)
    decoded = []
    while (got := decoder.process_buffer()) is not None:
        decoded.append(got)
    assert [(int(d.opcode), bytes(d.payload), d.frame_finished, d.message_finished) for d in decoded] == [
        (opcode, payload, True, fin)
    ]
    # Our parser reads the same frame back once masked, as a client would send it.
    if opcode == wsframes.OP_BINARY and fin:
        masked = frame[:1] + bytes([frame[1] | 0x80]) + frame[2 : len(frame) - len(payload)] + b"\0\0\0\0" + payload
        assert FrameParser(1 << 20).feed(masked) == [Message(payload, False)]


@BOUNDED
@given(st.text(max_size=200), st.binary(min_size=4, max_size=4), st.lists(st.integers(0, 1000), max_size=10))
def test_text_roundtrip_any_split(text, mask, cuts):
    data = text.encode()
    frames = chunked(data, cuts)
    wire = b"".join(
        encode(Frame(wsframes.OP_TEXT if i == 0 else wsframes.OP_CONT, piece, fin=i == len(frames) - 1), mask)
        for i, piece in enumerate(frames)
    )
    assert ours(chunked(wire, cuts)) == [Message(data, True)]


@BOUNDED
@given(st.lists(st.binary(max_size=64), max_size=40), st.integers(1, 64), st.integers(1, 8))
def test_arbitrary_bytes_never_raise_and_stay_bounded(chunks, max_size, max_fragments):
    parser = FrameParser(max_size, max_fragments=max_fragments)
    seen_failure = False
    for chunk in chunks:
        events = parser.feed(chunk)
        assert not seen_failure or events == []
        for event in events:
            assert isinstance(event, (Message, Control, Close, TooBig, Failure))
            if isinstance(event, Message):
                assert len(event.data) <= max_size
                if event.text:
                    event.data.decode("utf-8")
            seen_failure |= isinstance(event, Failure)
        # Held: at most one partial header (14 bytes) plus one message within its cap.
        assert len(parser._buf) < 14
        assert sum(map(len, parser._parts or [])) <= max_size
