import pytest

from edgestate import wsframes
from tests.wsclient import masked


def test_accept_key_rfc_example():
    assert wsframes.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 65535, 65536])
def test_frame_lengths_roundtrip(size):
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    parser = wsframes.FrameParser(1 << 20)
    [message] = parser.feed(masked(wsframes.OP_TEXT, payload))
    assert message == wsframes.Message(payload, True)
    frame = wsframes.text_frame(payload)
    assert frame.endswith(payload) and frame[0] == 0x81


def test_byte_by_byte_and_fragments():
    parser = wsframes.FrameParser(100)
    data = masked(wsframes.OP_TEXT, b"hel", fin=False) + masked(wsframes.OP_PING, b"p") + masked(0, b"lo")
    events = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert events == [wsframes.Control(wsframes.OP_PING, b"p"), wsframes.Message(b"hello", True)]


def test_oversized_message_skipped_without_buffering_and_parser_recovers():
    parser = wsframes.FrameParser(10)
    big = masked(wsframes.OP_TEXT, b"x" * 8, fin=False) + masked(0, b"y" * 8, fin=False) + masked(0, b"z" * 8)
    events = parser.feed(big + masked(wsframes.OP_TEXT, b"ok"))
    assert events == [wsframes.TooBig(16), wsframes.Message(b"ok", True)]
    assert len(parser._buf) == 0


def test_protocol_errors():
    with pytest.raises(wsframes.ProtocolError, match="masked"):
        wsframes.FrameParser(10).feed(b"\x81\x02hi")
    with pytest.raises(wsframes.ProtocolError, match="continuation"):
        wsframes.FrameParser(10).feed(masked(0, b"x"))
    with pytest.raises(wsframes.ProtocolError, match="control"):
        wsframes.FrameParser(1000).feed(masked(wsframes.OP_PING, b"x" * 126))
    with pytest.raises(wsframes.ProtocolError, match="reserved"):
        wsframes.FrameParser(10).feed(b"\xc1\x80" + b"\0" * 4)


def test_close_frame_code():
    frame = wsframes.close_frame(1001, "bye")
    assert frame[0] == 0x88 and wsframes.parse_close(frame[2:]) == 1001
    assert wsframes.parse_close(b"") == 1005
