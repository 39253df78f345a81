"""Load client of ``python -m bench rpc`` (its own process: file descriptors and CPU apart).

    python -m bench.rpcclient subscribe ES_URL SIM_URL N PATH ADDR[,ADDR...]

Opens N raw WebSocket clients to ES_URL+PATH from the given loopback source addresses;
on /rpc each sends accountSubscribe(pot); then it changes the jackpot at the simulator
(one POST to /control/jackpot, wall clock noted) and records when each client receives
the frame carrying the new value. Prints one JSON line. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import time
from typing import Any

import httpx
import trio

_MASK = b"\x11\x22\x33\x44"


def _masked_text(payload: bytes) -> bytes:
    n = len(payload)
    head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
    return head + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))


_PONG = struct.pack("!BB", 0x8A, 0x80) + _MASK


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def frame(self) -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 2:
                n, pos = self.buf[1] & 0x7F, 2
                if n == 126 and len(self.buf) >= 4:
                    n, pos = struct.unpack_from("!H", self.buf, 2)[0], 4
                if (n < 126 or pos == 4) and len(self.buf) >= pos + n:
                    op, payload = self.buf[0] & 0x0F, bytes(self.buf[pos : pos + n])
                    del self.buf[: pos + n]
                    if op == 0x9:
                        await self.stream.send_all(_PONG)
                        continue
                    return op, payload
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data


async def connect(url: str, path: str, source: str) -> Client:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port), local_address=source)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    client = Client(stream)
    while b"\r\n\r\n" not in client.buf:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError("closed during handshake")
        client.buf += data
    head, _, rest = bytes(client.buf).partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n")[0]:
        raise ConnectionError(head.split(b"\r\n")[0].decode())
    client.buf = bytearray(rest)
    return client


async def subscribe(es: str, sim: str, n: int, path: str, sources: list[str]) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        pot = (await http.get(es + "/api/lottery/state")).json()["potAccount"]
        clients: list[Client] = []
        t0 = time.monotonic()
        limit = trio.CapacityLimiter(200)

        async def one(i: int) -> None:
            async with limit:
                client = await connect(es, path, sources[i % len(sources)])
                if path == "/rpc":
                    req = {"jsonrpc": "2.0", "id": i, "method": "accountSubscribe",
                           "params": [pot, {"encoding": "base64", "commitment": "confirmed"}]}
                    await client.stream.send_all(_masked_text(json.dumps(req).encode()))
                    _, payload = await client.frame()
                    assert "result" in json.loads(payload), payload
                else:
                    await client.frame()  # the first stateUpdate
                clients.append(client)

        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
        connect_s = time.monotonic() - t0
        stats = (await http.get(es + "/stats")).json()
        sim_counters = (await http.get(sim + "/control/stats")).json()["counters"]
        value = 123_456_789_000 + n
        times: list[float] = []

        async def wait_value(client: Client) -> None:
            while True:
                _, payload = await client.frame()
                if path == "/rpc" and b"accountNotification" in payload:
                    lamports = json.loads(payload)["params"]["result"]["value"]["lamports"]
                elif path == "/ws" and b"stateUpdate" in payload:
                    lamports = round(json.loads(payload)["state"]["jackpot"] * 1e9)
                else:
                    continue
                if lamports == value:
                    times.append(time.time())
                    return

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(wait_value, client)
                await trio.sleep(0.5)
                sent = time.time()
                await http.post(sim + "/control/jackpot", json={"lamports": value})
        for client in clients:
            await client.stream.aclose()
        lat = sorted((t - sent) * 1000 for t in times)
        rpc = stats.get("rpc", {}).get("pubsub", {})
        return {
            "path": path, "clients": n, "connect_s": round(connect_s, 1), "received": len(times),
            "first_ms": round(lat[0], 1), "p50_ms": round(lat[len(lat) // 2], 1), "last_ms": round(lat[-1], 1),
            "upstream_subscriptions": rpc.get("upstream_subscriptions"),
            "client_subscriptions": rpc.get("client_subscriptions"),
            "sim_ws_subscriptions_active": sim_counters.get("ws_subscriptions_active"),
        }


def main() -> None:
    _, es, sim, n, path, sources = sys.argv[1:7] if sys.argv[1] == "subscribe" else sys.exit(2)  # type: ignore[misc]
    print(json.dumps(trio.run(subscribe, es, sim, int(n), path, sources.split(","))), flush=True)


if __name__ == "__main__":
    main()
