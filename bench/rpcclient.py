"""Load client of ``python -m bench rpc`` (its own process: file descriptors and CPU apart).

    python -m bench.rpcclient subscribe ES_URL SIM_URL N PATH ADDR[,ADDR...]
    python -m bench.rpcclient readmix TARGET_URL SIM_URL N WARMUP_S MEASURE_S [ES_URL]
    python -m bench.rpcclient statuses TARGET_URL SIM_URL WALLETS ROUNDS

subscribe: opens N raw WebSocket clients to ES_URL+PATH from the given loopback source
addresses; on /rpc each sends accountSubscribe(pot); then it changes the jackpot at the
simulator (one POST to /control/jackpot, wall clock noted) and records when each client
receives the frame carrying the new value.

readmix: N simulated frontends, each polling its own wallet's getBalance,
getLatestBlockhash and getSlot every 3-7 s (uniform jitter, random phase), sent to
TARGET_URL (edgestate's /rpc, or the simulator itself for the before line). The calls of
the frontends due within one 10 ms tick travel together as JSON-RPC batches of at most
33 frontends (99 calls) over a few keep-alive connections: one Python process could not
open an HTTP request per frontend at 10,000 frontends (2,000 requests/s) without being
the bottleneck, and the proxy answers each batch item on its own (cache, single-flight,
the pool's merging), so the upstream figures are those of single calls arriving at the
same times. The simulator's counters are read at the start and end of the measured
window (after WARMUP_S, so the caches are in their steady state).

statuses: WALLETS wallets, each polling getSignatureStatuses for its own signature once a
second at its own random phase (as wallets confirming a transaction do), one HTTP request
per poll (web3.js does not batch) on the wallet's own keep-alive connection (a browser's),
ROUNDS rounds; counts
the upstream getSignatureStatuses calls at the simulator and each poll's answer time.

Each prints one JSON line. Bounded: every wait has a deadline.
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


_TICK = 0.01
_PER_BATCH = 33  # frontends per JSON-RPC batch: 99 calls, under rpc.max_batch (100)
_CONNS = 16
_PERIOD = (3.0, 7.0)  # seconds between two polls of one frontend


def _frontend_calls(i: int, wallet: str) -> bytes:
    """One frontend's poll: its wallet's balance, the blockhash and the slot (web3.js shapes)."""
    conf = {"commitment": "confirmed"}
    calls = [("getBalance", [wallet, conf]), ("getLatestBlockhash", [conf]), ("getSlot", [conf])]
    return b",".join(json.dumps({"jsonrpc": "2.0", "id": 3 * i + k, "method": m, "params": p},
                                separators=(",", ":")).encode() for k, (m, p) in enumerate(calls))


class _Http:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and returns the body."""

    def __init__(self, url: str) -> None:
        rest = url.removeprefix("http://")
        hostport, _, path = rest.partition("/")
        self.host, port = hostport.split(":")
        self.port = int(port)
        self.path = "/" + path
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        self.buf.clear()

    async def post(self, body: bytes) -> bytes:
        if self.stream is None:
            await self.connect()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        await self.stream.send_all(head + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        lines = bytes(self.buf[:end]).split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                       if k.strip().lower() == b"content-length"), None)
        if length is None:
            raise ConnectionError(f"no content-length in the reply (status {status})")
        del self.buf[: end + 4]
        while len(self.buf) < length:
            await self._more()
        reply = bytes(self.buf[:length])
        del self.buf[:length]
        if status != 200:
            raise ConnectionError(f"HTTP {status}: {reply[:200]!r}")
        return reply

    async def _more(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(1 << 20)
        if not data:
            self.stream = None
            raise EOFError("connection closed")
        self.buf += data


async def _counters(http: httpx.AsyncClient, sim: str) -> dict[str, Any]:
    counters: dict[str, Any] = (await http.get(sim + "/control/stats")).json()["counters"]
    return counters


async def readmix(target: str, sim: str, n: int, warmup: float, measure: float, es: str | None) -> dict[str, Any]:
    import heapq
    import random

    from solders.pubkey import Pubkey

    rng = random.Random(n)
    bodies = [_frontend_calls(i, str(Pubkey(rng.randbytes(32)))) for i in range(n)]
    start = trio.current_time()
    heap = [(start + rng.uniform(0, _PERIOD[1]), i) for i in range(n)]
    heapq.heapify(heap)
    end = start + warmup + measure
    send, recv = trio.open_memory_channel[tuple[float, list[int]]](_CONNS * 2)
    stats = {"frontend_polls": 0, "calls": 0, "errors": 0, "failed_batches": 0, "late_polls": 0}
    lat: list[float] = []
    window = {"on": False}

    async def worker(rx: trio.MemoryReceiveChannel[tuple[float, list[int]]]) -> None:
        conn = _Http(target)
        async for due, idx in rx:
            body = b"[" + b",".join(bodies[i] for i in idx) + b"]"
            reply = None
            for _attempt in range(2):  # once more on a fresh connection: the server may close an idle one
                try:
                    with trio.fail_after(30):
                        reply = await conn.post(body)
                    break
                except (OSError, EOFError, ConnectionError, trio.TooSlowError, ValueError, trio.BrokenResourceError):
                    conn = _Http(target)
            if reply is None:
                if window["on"]:
                    stats["failed_batches"] += 1
                continue
            if window["on"]:
                stats["frontend_polls"] += len(idx)
                stats["calls"] += 3 * len(idx)
                stats["errors"] += reply.count(b'"error"')
                lat.append(trio.current_time() - due)

    async with httpx.AsyncClient(timeout=10) as http:
        with trio.fail_after(warmup + measure + 60):
            async with trio.open_nursery() as nursery:
                with recv:
                    for _ in range(_CONNS):
                        nursery.start_soon(worker, recv.clone())
                with send:
                    before: dict[str, Any] = {}
                    es_before: dict[str, Any] = {}
                    t_measure = start + warmup
                    while True:
                        now = trio.current_time()
                        if not window["on"] and now >= t_measure:
                            before = await _counters(http, sim)
                            if es:
                                es_before = (await http.get(es + "/stats")).json().get("rpc", {})
                            t_measure, window["on"] = trio.current_time(), True
                        if now >= end:
                            break
                        due: list[int] = []
                        while heap and heap[0][0] <= now and len(due) < _PER_BATCH:
                            t, i = heapq.heappop(heap)
                            if now - t > 1.0 and window["on"]:
                                stats["late_polls"] += 1
                            heapq.heappush(heap, (t + rng.uniform(*_PERIOD), i))
                            due.append(i)
                        if due:
                            await send.send((now, due))
                            continue
                        await trio.sleep(max(0.0, min(_TICK, heap[0][0] - now)) if heap else _TICK)
                    after = await _counters(http, sim)
                    took = trio.current_time() - t_measure
                    window["on"] = False
        es_after = (await http.get(es + "/stats")).json().get("rpc", {}) if es else {}
    methods = {m: after["rpc_methods"].get(m, 0) - before["rpc_methods"].get(m, 0)
               for m in after["rpc_methods"]}
    methods = {m: round(v / took, 2) for m, v in sorted(methods.items()) if v}
    lat.sort()
    out: dict[str, Any] = {
        "frontends": n, "seconds": round(took, 1),
        "offered_calls_per_s": round(3 * n / sum(_PERIOD) * 2, 1),
        "client_calls_per_s": round(stats["calls"] / took, 1),
        "client_errors": stats["errors"], "failed_batches": stats["failed_batches"], "late_polls": stats["late_polls"],
        "p50_ms": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1) if lat else None,
        "upstream_http_per_s": round((after["http_requests"] - before["http_requests"]) / took, 2),
        "upstream_calls_per_s": round(sum(methods.values()), 2),
        "upstream_by_method": methods,
    }
    if es:
        out["proxy"] = _proxy_delta(es_before, es_after)
    return out


async def statuses(target: str, sim: str, wallets: int, rounds: int) -> dict[str, Any]:
    import random

    from solders.signature import Signature

    rng = random.Random(wallets)
    bodies = [json.dumps({"jsonrpc": "2.0", "id": i, "method": "getSignatureStatuses",
                          "params": [[str(Signature(rng.randbytes(64)))]]}).encode() for i in range(wallets)]
    waits: list[float] = []
    late: list[float] = []
    errors = 0
    limit = trio.CapacityLimiter(100)  # connects at a time

    async def wallet(i: int, t0: float, phase: float) -> None:
        nonlocal errors
        conn = _Http(target)
        async with limit:
            await conn.connect()
        for k in range(rounds):
            due = t0 + phase + k
            await trio.sleep_until(due)
            late.append(trio.current_time() - due)
            try:
                reply = await conn.post(bodies[i])
                errors += b'"result"' not in reply
            except (OSError, EOFError, ConnectionError, ValueError, trio.BrokenResourceError):
                errors += 1
                conn = _Http(target)
            waits.append(trio.current_time() - due)
        if conn.stream is not None:
            await conn.stream.aclose()

    async with httpx.AsyncClient(timeout=10) as http:
        before = await _counters(http, sim)
        with trio.fail_after(rounds + 120):
            t0 = trio.current_time() + 2.0  # every wallet connected first (server keep-alive: 5 s)
            async with trio.open_nursery() as nursery:
                for i in range(wallets):
                    nursery.start_soon(wallet, i, t0, rng.random())
            took = trio.current_time() - t0
        after = await _counters(http, sim)
    calls = after["rpc_methods"].get("getSignatureStatuses", 0) - before["rpc_methods"].get("getSignatureStatuses", 0)
    waits.sort()
    late.sort()
    return {"wallets": wallets, "polls": rounds, "upstream_calls": calls, "calls_per_poll": round(calls / rounds, 2),
            "client_errors": errors, "seconds": round(took, 1),
            "p50_ms": round(1000 * waits[len(waits) // 2], 1), "p99_ms": round(1000 * waits[int(len(waits) * 0.99)], 1),
            "max_ms": round(1000 * waits[-1], 1), "client_late_p99_ms": round(1000 * late[int(len(late) * 0.99)], 1)}


def _proxy_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Cache hits/misses/coalesced per method during the window (edgestate's /stats rpc)."""
    out = {}
    for m in ("getBalance", "getLatestBlockhash", "getSlot"):
        a, b = after.get("methods", {}).get(m, {}), before.get("methods", {}).get(m, {})
        d = {k: a.get(k, 0) - b.get(k, 0) for k in ("cache_hits", "cache_misses", "coalesced")}
        lookups = sum(d.values())
        d["hit_rate"] = round(d["cache_hits"] / lookups, 3) if lookups else 0.0
        out[m] = d
    return out


def main() -> None:
    if sys.argv[1] == "statuses":
        target, sim, wallets, rounds = sys.argv[2:6]
        print(json.dumps(trio.run(statuses, target, sim, int(wallets), int(rounds))), flush=True)
        return
    if sys.argv[1] == "readmix":
        target, sim, n, warmup, measure = sys.argv[2:7]
        es = sys.argv[7] if len(sys.argv) > 7 else None
        print(json.dumps(trio.run(readmix, target, sim, int(n), float(warmup), float(measure), es)), flush=True)
        return
    _, es, sim, n, path, sources = sys.argv[1:7] if sys.argv[1] == "subscribe" else sys.exit(2)  # type: ignore[misc]
    print(json.dumps(trio.run(subscribe, es, sim, int(n), path, sources.split(","))), flush=True)


if __name__ == "__main__":
    main()
