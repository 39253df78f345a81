"""Request-head parsing (heads.py): examples, and properties checked against h11.

h11 is the parser Hypercorn uses behind us. The property that matters: a head we accept,
h11 accepts too and reads the same way, so the in-memory answers and Hypercorn never
disagree about what a request was (the old hand-split fast path answered twice where h11
answered once).
"""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgestate.errors import BadRequest
from edgestate.heads import HeadReader, Request


async def parse(data: bytes, max_head: int = 16384) -> Request | None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(data)
    await send.aclose()
    return await HeadReader(receive, max_head).next_request(idle_timeout=1, head_timeout=1)


def h11_parse(data: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


async def test_parsed_fields():
    req = await parse(b"GET /api/price/abc?x=1 HTTP/1.1\r\nHost: h\r\nAccept: a\r\nAccept: b\r\n"
                      b"Connection: keep-alive, Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert req is not None
    assert (req.method, req.path, req.query, req.version) == ("GET", "/api/price/abc", "x=1", "1.1")
    assert req.headers["accept"] == "a, b"
    assert req.header_tokens("connection") == {"keep-alive", "upgrade"}
    assert req.upgrade and not req.has_body


async def test_keep_alive_rules_and_body():
    assert (await parse(b"GET / HTTP/1.0\r\n\r\n")).keep_alive is False
    assert (await parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")).keep_alive is True
    assert (await parse(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")).keep_alive is False
    req = await parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    assert req.has_body and req.head_size == len(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
    assert (await parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")).has_body is False


async def test_pipelined_heads_on_one_reader():
    send, receive = trio.testing.memory_stream_one_way_pair()
    reader = HeadReader(receive, 16384)
    await send.send_all(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    first = await reader.next_request(idle_timeout=1, head_timeout=1)
    reader.consume(first.head_size)
    second = await reader.next_request(idle_timeout=1, head_timeout=1)
    assert (first.path, second.path) == ("/a", "/b")


async def test_eof_and_limits():
    assert await parse(b"") is None
    with pytest.raises(BadRequest) as info:
        await parse(b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n", max_head=2048)
    assert info.value.status == 431


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
                 min_size=1, max_size=12)
_VALUE = st.binary(max_size=24)
_PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=30).map(lambda p: "/" + p)
_METHOD = st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    lines = [f"{draw(_METHOD)} {draw(_PATH)} HTTP/{draw(st.sampled_from(['1.1', '1.0']))}".encode()]
    if draw(st.booleans()):
        lines.append(b"Host: " + draw(st.sampled_from([b"x", b"example.com:80"])))
    for _ in range(draw(st.integers(0, 5))):
        lines.append(draw(_TOKEN).encode() + draw(st.sampled_from([b": ", b":", b" : ", b":\t"])) + draw(_VALUE))
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    # Sometimes break it on purpose: a byte replaced, inserted or dropped.
    if draw(st.booleans()) and len(head) > 4:
        at = draw(st.integers(0, len(head) - 5))
        byte = bytes([draw(st.sampled_from([0, 9, 10, 13, 32, 58, 127, 255, 65]))])
        head = head[:at] + draw(st.sampled_from([byte, b"", byte + head[at:at + 1]])) + head[at + 1:]
    return head


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads())
def test_what_we_accept_h11_accepts_alike(data: bytes) -> None:
    try:
        ours = trio.run(parse, data)
    except BadRequest as exc:
        assert 400 <= exc.status < 600
        return
    if ours is None:  # incomplete head: nothing was answered
        return
    theirs = h11_parse(data[: ours.head_size])
    assert theirs is not None, f"we accepted what h11 rejects: {data!r}"
    assert theirs.method.decode() == ours.method
    assert theirs.target.decode("latin-1") == ours.target
    merged: dict[str, str] = {}
    for name, value in theirs.headers:
        key = name.decode().lower()
        merged[key] = value.decode("latin-1") if key not in merged else f"{merged[key]}, {value.decode('latin-1')}"
    assert merged == ours.headers


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_request_none_or_bad_request(data: bytes) -> None:
    try:
        result = trio.run(parse, data)
    except BadRequest as exc:
        assert exc.status in (400, 408, 431, 505)
    else:
        assert result is None or isinstance(result, Request)
