import struct
import tracemalloc

import pytest

from edgestate import wsframes
from edgestate.wsframes import Close, Control, Failure, FrameParser, Message, TooBig
from tests.wsclient import masked


def test_accept_key_rfc_example():
    assert wsframes.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_frame_lengths_roundtrip(size):
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    parser = FrameParser(1 << 20)
    [message] = parser.feed(masked(wsframes.OP_BINARY, payload))
    assert message == Message(payload, False)
    frame = wsframes.text_frame(payload)
    assert frame.endswith(payload) and frame[0] == 0x81


def test_byte_by_byte_and_fragments():
    parser = FrameParser(100)
    data = masked(wsframes.OP_TEXT, b"hel", fin=False) + masked(wsframes.OP_PING, b"p") + masked(0, b"lo")
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert events == [Control(wsframes.OP_PING, b"p"), Message(b"hello", True)]
    assert parser.frames == 3


def test_oversized_message_skipped_without_buffering_and_parser_recovers():
    parser = FrameParser(10)
    big = masked(wsframes.OP_TEXT, b"x" * 8, fin=False) + masked(0, b"y" * 8, fin=False) + masked(0, b"z" * 8)
    events = parser.feed(big + masked(wsframes.OP_TEXT, b"ok"))
    assert events == [TooBig(16), Message(b"ok", True)]
    assert len(parser._buf) == 0 and not parser._parts


def test_fragment_count_is_capped_and_empty_continuations_cost_no_memory():
    # Today's parser kept every empty continuation frame: +301 MB in 35 s from one client.
    parser = FrameParser(4096, max_fragments=32)
    assert parser.feed(masked(wsframes.OP_TEXT, b"a", fin=False)) == []
    empty = masked(0, b"", fin=False) * 1000
    assert parser.feed(empty[: 30 * 6]) == []
    assert parser.feed(empty[30 * 6 :]) == [TooBig(1)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            assert parser.feed(empty) == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10_000
    assert parser.frames == 1 + 51_000
    # The skipped message ends; the next one is parsed again.
    assert parser.feed(masked(0, b"") + masked(wsframes.OP_TEXT, b"ok")) == [Message(b"ok", True)]


def fails(data: bytes, max_size: int = 1000) -> Failure:
    *_, last = FrameParser(max_size).feed(data)
    assert isinstance(last, Failure)
    return last


def test_protocol_errors():
    assert "masked" in fails(b"\x81\x02hi").reason
    assert "continuation" in fails(masked(0, b"x")).reason
    assert "continuation" in fails(masked(wsframes.OP_TEXT, b"a", fin=False) + masked(wsframes.OP_TEXT, b"b")).reason
    assert "control" in fails(masked(wsframes.OP_PING, b"x" * 126)).reason
    assert "control" in fails(masked(wsframes.OP_PING, b"x", fin=False)).reason
    assert "reserved" in fails(b"\xc1\x80" + b"\0" * 4).reason
    assert "opcode" in fails(masked(0x3, b"")).reason
    assert "opcode" in fails(masked(0xB, b"")).reason
    assert "minimal" in fails(b"\x82\xfe\x00\x05" + b"\0" * 9).reason
    assert "minimal" in fails(b"\x82\xff" + struct.pack("!Q", 200) + b"\0" * 4).reason
    assert "significant" in fails(b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"\0" * 4).reason
    assert all(f.code == 1002 for f in [fails(b"\x81\x02hi"), fails(masked(0x3, b""))])


def test_events_before_a_failure_are_kept_and_the_parser_stops():
    parser = FrameParser(100)
    events = parser.feed(masked(wsframes.OP_TEXT, b"ok") + masked(0x5, b"") + masked(wsframes.OP_PING, b""))
    assert events[0] == Message(b"ok", True) and isinstance(events[1], Failure) and len(events) == 2
    assert parser.feed(masked(wsframes.OP_TEXT, b"more")) == []


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",
        b"\xed\xa0\x80",  # a UTF-16 surrogate
        b"\xc0\xaf",  # overlong
        "κόσμε".encode() + b"\xf4\x90\x80\x80",  # above U+10FFFF (Autobahn 6.4.1)
        b"ok\xe2\x82",  # ends inside a sequence
    ],
)
def test_invalid_utf8_text_is_1007(payload):
    assert fails(masked(wsframes.OP_TEXT, payload)).code == wsframes.CLOSE_INVALID_DATA
    # Binary messages are not text: no validation.
    assert FrameParser(100).feed(masked(wsframes.OP_BINARY, payload)) == [Message(payload, False)]


def test_utf8_fails_fast_mid_frame_and_across_fragments():
    # The frame announces 100 bytes; the bad sequence is in the first ten: fail now.
    frame = masked(wsframes.OP_TEXT, "κόσμε".encode() + b"\xf4\x90" + b"a" * 87)
    parser = FrameParser(1000)
    assert parser.feed(frame[:6]) == []
    [failure] = parser.feed(frame[6 : 6 + 14])
    assert failure.code == 1007
    # A code point split between fragments is fine; a bad one across them is not.
    euro = "€".encode()
    ok = masked(wsframes.OP_TEXT, euro[:1], fin=False) + masked(0, euro[1:])
    assert FrameParser(100).feed(ok) == [Message(euro, True)]
    parser = FrameParser(100)
    assert parser.feed(masked(wsframes.OP_TEXT, b"\xce", fin=False)) == []
    [failure] = parser.feed(masked(0, b"\x20", fin=False))  # not a continuation byte
    assert failure.code == 1007


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_1002(code):
    assert fails(masked(wsframes.OP_CLOSE, struct.pack("!H", code))).code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes(code):
    payload = struct.pack("!H", code) + "bye ✓".encode()
    assert FrameParser(100).feed(masked(wsframes.OP_CLOSE, payload)) == [Close(code, "bye ✓")]


def test_close_payloads():
    assert FrameParser(100).feed(masked(wsframes.OP_CLOSE, b"")) == [Close(1005, "")]
    assert fails(masked(wsframes.OP_CLOSE, b"\x03")).code == 1002
    assert fails(masked(wsframes.OP_CLOSE, b"\x03\xe8\xff")).code == 1007


def test_close_frame_code_and_reason_cut_on_a_character_boundary():
    frame = wsframes.close_frame(1001, "bye")
    assert frame[0] == 0x88 and wsframes.parse_close(frame[2:]) == 1001
    assert wsframes.parse_close(b"") == 1005
    long = wsframes.close_frame(1000, "é" * 100)  # 200 bytes of UTF-8
    assert len(long) <= 127
    assert long[4:].decode("utf-8") == "é" * 61
