"""Locust scenario for load-testing your own edgestate deployment.

Install (not a dependency of edgestate, not installed by the benchmark harness):

    pip install locust websocket-client

Run against a deployment (web UI on http://localhost:8089):

    locust -f bench/locustfile.py --host https://edge.example.com

or headless, e.g. 2,000 users spawned at 100/s for 5 minutes:

    locust -f bench/locustfile.py --host http://127.0.0.1:8080 --headless -u 2000 -r 100 -t 5m

Users (weights pick the mix):

- ``PollingUser`` — the old frontend: ``GET /api/state`` every ~30 s (set ``EDGESTATE_POLL_S``),
  now and then ``GET /api/price/<mint>`` and ``GET /api/lottery/state``.
- ``BalancesUser`` — ``POST /api/tokens/balances`` with ``EDGESTATE_WALLETS`` wallets
  (default 10 random, valid pubkeys; they get 0 unless they hold the mint).
- ``WebSocketUser`` — holds a ``/ws`` connection, reports every ``stateUpdate`` as a Locust
  request named ``ws stateUpdate`` (response time = time since the previous one, so a gap
  shows up) and sends ``{"type":"ping"}`` every 20 s. Needs ``websocket-client``; it is
  skipped (weight 0) without it.

Environment:
  EDGESTATE_MINT       token mint for /api/price and balances (default: config.toml's token.mint)
  EDGESTATE_POLL_S     seconds between a PollingUser's polls (default 30)
  EDGESTATE_WALLETS    wallets per balances request (default 10)
  EDGESTATE_WS_WEIGHT  weight of WebSocketUser (default 3; 0 disables it)

Each Locust worker is one process with its own open-files limit: for thousands of WebSocket
users run several workers (``--processes -1`` on Locust ≥ 2.17, or master/worker mode).
What to watch on the server meanwhile: ``GET /stats`` (api.requests_per_s, broadcaster
subscribers, upstream/pool request rate) — the upstream rate must not move with the load.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, User, between, events, task

MINT = os.environ.get("EDGESTATE_MINT", "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU")
POLL_S = float(os.environ.get("EDGESTATE_POLL_S", "30"))
N_WALLETS = int(os.environ.get("EDGESTATE_WALLETS", "10"))
WS_WEIGHT = int(os.environ.get("EDGESTATE_WS_WEIGHT", "3"))

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _random_pubkey() -> str:
    n = int.from_bytes(os.urandom(32), "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return out.rjust(32, "1")


class PollingUser(HttpUser):
    """The old frontend: one state poll every ~30 s."""

    weight = 10
    wait_time = between(POLL_S * 0.9, POLL_S * 1.1)

    @task(10)
    def state(self) -> None:
        self.client.get("/api/state", name="/api/state")

    @task(2)
    def price(self) -> None:
        self.client.get(f"/api/price/{MINT}", name="/api/price/[mint]")

    @task(1)
    def lottery(self) -> None:
        self.client.get("/api/lottery/state", name="/api/lottery/state")


class BalancesUser(HttpUser):
    weight = 1
    wait_time = between(5, 15)

    @task
    def balances(self) -> None:
        wallets = [_random_pubkey() for _ in range(N_WALLETS)]
        self.client.post("/api/tokens/balances", json={"wallets": wallets, "tokenMint": MINT},
                         name=f"/api/tokens/balances ({N_WALLETS})")


try:
    import websocket  # websocket-client
except ImportError:  # pragma: no cover - optional
    websocket = None


class WebSocketUser(User):
    """Holds /ws; each stateUpdate is reported to Locust's statistics."""

    weight = WS_WEIGHT if websocket is not None else 0
    wait_time = between(1, 1)

    def on_start(self) -> None:
        url = self.host.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + "/ws"
        t0 = time.perf_counter()
        try:
            self.ws = websocket.create_connection(url, timeout=30)
        except Exception as exc:  # noqa: BLE001 - reported to Locust
            events.request.fire(request_type="WS", name="ws connect", response_time=(time.perf_counter() - t0) * 1000,
                                response_length=0, exception=exc, context={})
            raise
        events.request.fire(request_type="WS", name="ws connect", response_time=(time.perf_counter() - t0) * 1000,
                            response_length=0, exception=None, context={})
        self.ws.settimeout(1.0)
        self.last = time.perf_counter()
        self.next_ping = time.monotonic() + 20 + random.random()

    @task
    def receive(self) -> None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            except Exception as exc:  # noqa: BLE001 - connection lost: report and reconnect
                events.request.fire(request_type="WS", name="ws receive", response_time=0, response_length=0,
                                    exception=exc, context={})
                self.on_start()
                return
            now = time.perf_counter()
            try:
                kind = json.loads(raw).get("type")
            except (ValueError, AttributeError):
                kind = "invalid"
            events.request.fire(request_type="WS", name=f"ws {kind}", response_time=(now - self.last) * 1000,
                                response_length=len(raw), exception=None, context={})
            self.last = now
        if time.monotonic() >= self.next_ping:
            self.ws.send('{"type":"ping"}')
            self.next_ping = time.monotonic() + 20

    def on_stop(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
