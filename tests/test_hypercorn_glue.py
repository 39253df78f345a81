"""Pins the Hypercorn internals hypercorn_glue.py relies on, so an upgrade that moves them fails here."""

from __future__ import annotations

import inspect

import trio
import trio.testing
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from edgestate.hypercorn_glue import HypercornBridge, PrefixedStream
from tests.conftest import make_config


def test_internal_signatures():
    assert list(inspect.signature(TCPServer.__init__).parameters) == ["self", "app", "config", "context", "state",
                                                                      "stream"]
    assert list(inspect.signature(Lifespan.__init__).parameters)[:4] == ["self", "app", "config", "state"]
    assert list(inspect.signature(wrap_app).parameters)[:3] == ["app", "wsgi_max_body_size", "mode"]
    assert hasattr(WorkerContext(None), "terminated")
    assert callable(ConnectionState)
    for name in ("handle_lifespan", "wait_for_startup", "wait_for_shutdown"):
        assert inspect.iscoroutinefunction(getattr(Lifespan, name))


async def _echo_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": scope["path"].encode()[:2]})


async def test_bridge_replays_the_bytes_already_read_and_closes(nursery):
    with trio.fail_after(10):
        cfg = make_config()
        bridge = HypercornBridge(_echo_app, cfg.server, send_timeout=5.0)
        await nursery.start(bridge.run)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]

        async def accept_one() -> None:
            stream = await listener.accept()
            # The front door read the head already: Hypercorn gets those bytes first.
            await bridge.serve(stream, b"GET /ab HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

        nursery.start_soon(accept_one)
        client = await trio.open_tcp_stream("127.0.0.1", port)
        answer = b""
        while chunk := await client.receive_some(1024):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"/a")
        await client.aclose()
        await listener.aclose()
        bridge.stop()


async def test_prefixed_stream_send_deadline(autojump_clock):
    left, right = trio.testing.lockstep_stream_pair()  # a peer that never reads

    class FakeSocket:
        def shutdown(self, how: int) -> None: ...
        def close(self) -> None: ...

    left.socket = FakeSocket()  # type: ignore[attr-defined]
    stream = PrefixedStream(left, b"", send_timeout=1.0)  # type: ignore[arg-type]
    try:
        with trio.fail_after(5):
            await stream.send_all(b"x")
    except trio.BrokenResourceError as exc:
        assert "1s" in str(exc)
    else:
        raise AssertionError("a send to a peer that never reads must fail after the deadline")
