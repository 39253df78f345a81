"""A minimal raw WebSocket client for tests: exact control over frames and reading."""

from __future__ import annotations

import base64
import json
import os
import struct

import trio

from edgestate import wsframes


def masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class WsClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, url: str, *, origin: str | None = None, path: str = "/ws", extra: bytes = b"") -> WsClient:
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        return await cls.handshake(stream, host=host, origin=origin, path=path, extra=extra)

    @classmethod
    async def handshake(
        cls, stream: trio.abc.Stream, *, host: str = "x", origin: str | None = None, path: str = "/ws",
        extra: bytes = b"",
    ) -> WsClient:
        """Upgrade ``stream``; ``extra`` (e.g. frames) is sent in the same write as the head."""
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        )
        if origin:
            head += f"Origin: {origin}\r\n"
        await stream.send_all((head + "\r\n").encode() + extra)
        client = cls(stream)
        status, headers = await client.read_head()
        client.status, client.headers = status, headers
        if status == 101:
            assert headers["sec-websocket-accept"] == wsframes.accept_key(key)
        return client

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.buf += data

    async def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers

    async def read_body(self, length: int) -> bytes:
        while len(self.buf) < length:
            await self._fill()
        body, self.buf = bytes(self.buf[:length]), self.buf[length:]
        return body

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        while True:
            if len(self.buf) >= 2:
                n, pos = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, pos = struct.unpack_from("!H", self.buf, 2)[0], 4
                elif n == 127 and len(self.buf) >= 10:
                    n, pos = struct.unpack_from("!Q", self.buf, 2)[0], 10
                if n < 126 or pos > 2:
                    if len(self.buf) >= pos + n:
                        opcode = self.buf[0] & 0x0F
                        payload = bytes(self.buf[pos : pos + n])
                        del self.buf[: pos + n]
                        return opcode, payload
            await self._fill()

    async def message(self) -> dict:
        """The next JSON text message (answering pings on the way)."""
        while True:
            opcode, payload = await self.frame()
            if opcode == wsframes.OP_TEXT:
                return json.loads(payload)
            if opcode == wsframes.OP_PING:
                await self.send_raw(masked(wsframes.OP_PONG, payload))
            elif opcode == wsframes.OP_CLOSE:
                raise ConnectionError(f"closed {wsframes.parse_close(payload)}")

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == wsframes.OP_CLOSE:
                return wsframes.parse_close(payload)

    async def frames_until_eof(self) -> list[tuple[int, bytes]]:
        """Every frame the server still sends, until it closes the TCP connection."""
        frames = []
        while True:
            try:
                frames.append(await self.frame())
            except (EOFError, trio.BrokenResourceError):
                return frames

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(self, obj: object) -> None:
        await self.send_raw(masked(wsframes.OP_TEXT, json.dumps(obj).encode()))

    async def aclose(self) -> None:
        await self.stream.aclose()
