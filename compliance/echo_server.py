"""An echo WebSocket at ``/``, built from the same modules as /ws, for the
Autobahn|Testsuite fuzzing client (``compliance/run.sh``).

/ws itself speaks a JSON protocol and sends a ``stateUpdate`` first, so the echo cases
cannot run against it. This server reads and parses the head as the front door does
(``heads.HeadReader``), accepts the upgrade with ``ws.check_upgrade``, and runs the same
receive side (``ws.receive`` over ``wsframes.FrameParser``); only the message handler
differs: it sends every message back. Unlike /ws it writes with backpressure (it stops
reading while a peer does not take its echo), and its limits fit Autobahn's case 9
(messages of 16 MiB, 4 MiB in 64-byte fragments).

Usage: ``python compliance/echo_server.py --bind HOST:PORT``. Prints nothing but errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

import trio

try:
    from edgestate import config, ws, wsframes
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from edgestate import config, ws, wsframes
from edgestate.errors import BadRequest
from edgestate.heads import HeadReader
from edgestate.listen import peer_of
from edgestate.views import HttpDate, error_response

log = logging.getLogger("edgestate.compliance")

MAX_MESSAGE = 16 * 2**20 + 1024  # case 9.1.6 / 9.2.6: 16 MiB messages
MAX_FRAGMENTS = 2**17  # case 9.3.1 / 9.4.1: 4 MiB in 64-byte fragments (65,536 frames)
MAX_CLIENTS = 256  # beyond: accepted and closed at once with 1013
MAX_HEAD = 16384
HEAD_TIMEOUT = 10.0
SEND_TIMEOUT = 60.0  # a peer that takes no echo for this long is given up
READ_SIZE = 65536

_DATE = HttpDate()


class Echo:
    """The echo handler: every message back as it came, pings answered, 1009 when too big."""

    __slots__ = ("_stream", "closing")

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.closing = False

    async def on_event(self, event: wsframes.Message | wsframes.Control | wsframes.TooBig, frames: int) -> None:
        if isinstance(event, wsframes.Message):
            await self._send(wsframes.encode_frame(wsframes.OP_TEXT if event.text else wsframes.OP_BINARY, event.data))
        elif isinstance(event, wsframes.TooBig):
            await self.send_close(wsframes.CLOSE_TOO_BIG, f"message over {MAX_MESSAGE} bytes")
        elif event.opcode == wsframes.OP_PING:
            await self._send(wsframes.encode_frame(wsframes.OP_PONG, event.payload))

    def on_frames(self, frames: int) -> None:
        pass  # no rate limit: the fuzzer sends as fast as it can

    async def send_close(self, code: int, reason: str = "") -> None:
        if self.closing:
            return
        await self._send(wsframes.close_frame(code, reason))
        self.closing = True

    async def _send(self, frame: bytes) -> None:
        if self.closing:
            return
        try:
            with trio.move_on_after(SEND_TIMEOUT) as waited:
                await self._stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.closing = True
            return
        if waited.cancelled_caught:  # a partial frame may be out: nothing more can follow
            log.warning("echo: peer took nothing for %gs, giving up", SEND_TIMEOUT)
            self.closing = True


class EchoServer:
    """Accepts upgrades at ``/`` and echoes; one task per connection, each guarded."""

    def __init__(self) -> None:
        self._cfg = config.Config()
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        host, port = peer_of(stream)
        peer = f"{host}:{port}"
        try:
            await self._serve(stream, peer)
        except Exception:  # one connection's problem, never the server's
            log.exception("echo %s: unexpected error", peer)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, peer: str) -> None:
        reader = HeadReader(stream, MAX_HEAD)
        try:
            request = await reader.next_request(idle_timeout=HEAD_TIMEOUT, head_timeout=HEAD_TIMEOUT)
            if request is None:
                return
            if request.path != "/":
                raise BadRequest(404, "not_found", "the echo WebSocket is at /")
            key = ws.check_upgrade(request, self._cfg)
        except BadRequest as exc:
            extra = [(b"sec-websocket-version", b"13")] if exc.status == 426 else []
            with trio.move_on_after(HEAD_TIMEOUT):
                await stream.send_all(error_response(exc.status, exc.code, exc.message, date=_DATE.get(), extra=extra))
            return
        with trio.move_on_after(HEAD_TIMEOUT):
            await stream.send_all(wsframes.switching_protocols(key))
            if self.active >= MAX_CLIENTS:
                await stream.send_all(wsframes.close_frame(wsframes.CLOSE_TRY_AGAIN_LATER, "server full"))
                return
        rest = bytes(reader.buffer[request.head_size :])
        parser = wsframes.FrameParser(MAX_MESSAGE, max_fragments=MAX_FRAGMENTS)
        self.active += 1
        try:
            await ws.receive(stream, Echo(stream), parser, peer=peer, unread=rest, read_size=READ_SIZE)
        finally:
            self.active -= 1


async def serve(host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the echo WebSocket on ``host:port`` until cancelled; reports the bound port."""
    server = EchoServer()
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(server.handle, listeners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9001", help="HOST:PORT to listen on (default %(default)s)")
    args = parser.parse_args(argv)
    host, sep, port = args.bind.rpartition(":")
    if not sep or not host or not port.isdigit():
        parser.error(f"--bind: expected HOST:PORT, got {args.bind!r}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(partial(serve, host, int(port)))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"echo_server: cannot listen on {args.bind}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
