"""The HTTP API: the frontend's routes, health, stats and metrics.

``create_app(services)`` returns an ASGI app: a thin fast path for the hot, in-memory
GETs (/api/state and the lottery views: bodies prepared once per state change, ETag,
304, CORS) in front of the Quart-Trio app that serves everything else. The front door
(frontdoor.py) answers those GETs without ASGI at all through
:meth:`FastPath.raw_response`; the ASGI path remains for what reaches Hypercorn (e.g.
HTTP/1.0 clients or a request with a query string).
"""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import cachetools
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from solders.pubkey import Pubkey
from werkzeug.exceptions import HTTPException

from . import __version__, metrics
from .cache import Cached
from .errors import EdgeStateError, Overloaded, RateLimited, UpstreamTimeout
from .state import Snapshot
from .upstream.rpc import InvalidMint

if TYPE_CHECKING:
    from .server import Services

log = logging.getLogger("edgestate.http")
access_log = logging.getLogger("edgestate.access")

JSON = "application/json"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=10).hexdigest() + '"'


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class ApiStats:
    """Requests by route and status, latency percentiles, request rate."""

    def __init__(self) -> None:
        self.by_route: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[int] = collections.Counter()
        self.requests = 0
        self.errors = 0
        self.not_modified = 0
        self.from_memory = 0
        self.rate_limited = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=2048)
        self._recent: collections.deque[float] = collections.deque(maxlen=100_000)

    def record(self, route: str, status: int, seconds: float, *, from_memory: bool = False) -> None:
        self.requests += 1
        self.by_route[route] += 1
        self.by_status[status] += 1
        self.errors += status >= 500
        self.not_modified += status == 304
        self.from_memory += from_memory
        self._latencies.append(seconds)
        self._recent.append(trio.current_time())

    def stats(self) -> dict[str, Any]:
        now = trio.current_time()
        while self._recent and self._recent[0] < now - 10:
            self._recent.popleft()
        lat = sorted(self._latencies)

        def pct(p: float) -> float:
            return round(lat[int(p * (len(lat) - 1))] * 1000, 3) if lat else 0.0

        return {
            "requests": self.requests,
            "requests_per_s": round(len(self._recent) / 10, 2),
            "by_route": dict(self.by_route),
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "served_from_memory": self.from_memory,
            "cache_hit_rate": round(self.from_memory / self.requests, 4) if self.requests else 0.0,
            "not_modified": self.not_modified,
            "rate_limited": self.rate_limited,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99)},
        }


class ClientLimiter:
    """Per-client-address token buckets (``api.per_client_rps``; 0 = off)."""

    def __init__(self, rps: float, trusted_proxies: tuple[str, ...]) -> None:
        self.rps = rps
        self._burst = max(1.0, 2 * rps)
        self._buckets: cachetools.LRUCache[str, list[float]] = cachetools.LRUCache(maxsize=100_000)
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address; X-Forwarded-For only when the peer is a trusted proxy."""
        peer = peer or "?"
        if forwarded_for and self._trusted:
            try:
                if any(ipaddress.ip_address(peer) in net for net in self._trusted):
                    return forwarded_for.split(",")[0].strip() or peer
            except ValueError:
                pass
        return peer

    def allow(self, address: str) -> bool:
        if self.rps <= 0:
            return True
        now = trio.current_time()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self.rps)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True


_IN_MEMORY_ROUTES = frozenset({"/api/state", "/api/lottery/state", "/api/lottery/participants/count"})
_PRICE_PREFIX = "/api/price/"


class _Views:
    """Response bodies derived from a snapshot, built once per state version."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._version = -1
        self._bodies: dict[str, tuple[bytes, str] | None] = {}

    def get(self, snapshot: Snapshot, path: str) -> tuple[bytes, str] | None:
        if snapshot.version != self._version:
            self._version = snapshot.version
            self._bodies = self._build(snapshot)
        return self._bodies[path]

    def _build(self, s: Snapshot) -> dict[str, tuple[bytes, str] | None]:
        lottery = self._services.cfg.lottery
        view = {
            "jackpot": s.jackpot,
            "jackpotLamports": s.jackpot_lamports,
            "participants": s.participants,
            "potAccount": lottery.pot_account,
            "programId": lottery.program_id,
            "slot": s.slot,
            "lastUpdate": s.last_update_ms,
            "stale": s.stale,
        }
        lottery_body = json.dumps(view, separators=(",", ":")).encode()
        count = None
        if s.participants is not None:
            count_body = json.dumps({"count": s.participants, "lastUpdate": s.last_update_ms}, separators=(",", ":")).encode()
            count = (count_body, _etag(count_body))
        return {
            "/api/state": (s.body, s.etag),
            "/api/lottery/state": (lottery_body, _etag(lottery_body)),
            "/api/lottery/participants/count": count,
        }


class FastPath:
    """ASGI wrapper answering the in-memory GETs itself, everything else via Quart.

    The front door (frontdoor.py) also calls :meth:`raw_response` directly for these
    routes on plain HTTP/1.1 connections; both paths share :meth:`respond`.
    """

    def __init__(self, app: QuartTrio, services: Services, helpers: _Helpers) -> None:
        self._app = app
        self._services = services
        self._helpers = helpers
        self._views = _Views(services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in _IN_MEMORY_ROUTES:
            await self._app(scope, receive, send)  # type: ignore[arg-type]  # ASGI dicts vs Quart's TypedDicts
            return
        started = trio.current_time()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        client = (scope.get("client") or ("?", 0))[0]
        status, body, extra = self.respond(scope["method"], path, headers, client)
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        self._helpers.record(scope["method"], path, client, status, started)

    async def prepare(self, method: str, path: str) -> None:
        """Fetch what :meth:`raw_response` will need (a price not in memory yet).

        Failures are left to the app: the price stays out of memory, the connection is
        handed over, and the app answers with the proper error.
        """
        if method not in ("GET", "HEAD") or not path.startswith(_PRICE_PREFIX):
            return
        mint = path[len(_PRICE_PREFIX) :]
        if mint in self._helpers.price_bodies:
            return
        try:
            Pubkey.from_string(mint)
            cached = await self._services.prices.get_price(mint)
        except (EdgeStateError, ValueError):
            return
        if cached.value is not None:
            self._helpers.price_body(mint, cached)

    @staticmethod
    def is_fast(path: str) -> bool:
        """Whether the front door may try to answer ``path`` itself."""
        return path in _IN_MEMORY_ROUTES or (path.startswith(_PRICE_PREFIX) and "?" not in path)

    def raw_response(self, method: str, path: str, headers: dict[str, str], client: str, date: bytes,
                     close: bool) -> bytes | None:
        """The whole HTTP/1.1 response (head and body) as one byte string.

        None when it cannot be answered from memory (a price not recently served): the
        connection then goes to the full app.
        """
        started = trio.current_time()
        if path.startswith(_PRICE_PREFIX):
            answer = self._price_answer(method, path[len(_PRICE_PREFIX) :], headers, client)
            if answer is None:
                return None
            status, body, extra = answer
            route = "/api/price/<mint>"
        else:
            status, body, extra = self.respond(method, path, headers, client)
            route = path
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"")), b"date: " + date, b"server: edgestate"]
        lines += [name + b": " + value for name, value in extra]
        if status not in (204, 304) and not any(name == b"content-length" for name, _ in extra):
            lines.append(b"content-length: %d" % len(body))
        if close:
            lines.append(b"connection: close")
        self._helpers.record(method, route, client, status, started, path)
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if method == "HEAD" else body)

    def respond(self, method: str, path: str, headers: dict[str, str], client: str
                ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """(status, body, headers) for an in-memory route."""
        h = self._helpers
        origin = headers.get("origin")
        if method in ("GET", "HEAD"):
            status, body, extra = self._answer(path, headers, client)
        elif method == "OPTIONS":
            status, body, extra = 204, b"", h.preflight_headers(origin)
        else:
            status = 405
            body = error_body("method_not_allowed", f"{method} not allowed on {path}")
            extra = [(b"content-type", b"application/json"), (b"allow", b"GET, HEAD, OPTIONS")]
        return status, body, extra + h.cors_headers(origin)

    def _price_answer(self, method: str, mint: str, headers: dict[str, str], client: str
                      ) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
        """A price the app served moments ago, from its prebuilt body; None otherwise."""
        h = self._helpers
        entry = h.price_bodies.get(mint) if method in ("GET", "HEAD") else None
        if entry is None:
            return None
        if not h.allow(client, headers.get("x-forwarded-for")):
            return 429, h.rate_limited_body, [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        body, etag, _expires = entry
        cache = [(b"etag", etag.encode()), (b"cache-control", h.price_cache_control.encode())]
        cors = h.cors_headers(headers.get("origin"))
        if _etag_matches(headers.get("if-none-match"), etag):
            return 304, b"", cache + cors
        return 200, body, [(b"content-type", b"application/json"), *cache, *cors]

    def _answer(self, path: str, headers: dict[str, str], client: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        h = self._helpers
        if not h.allow(client, headers.get("x-forwarded-for")):
            return 429, h.rate_limited_body, [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        entry = self._views.get(self._services.state.snapshot, path)
        if entry is None:
            body = error_body("not_ready", "no participant count from upstream yet; retry shortly")
            return 503, body, [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        body, etag = entry
        cache = [(b"etag", etag.encode()), (b"cache-control", h.state_cache_control)]
        if _etag_matches(headers.get("if-none-match"), etag):
            return 304, b"", cache
        return 200, body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *cache]


_REASONS = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 405: b"Method Not Allowed",
            429: b"Too Many Requests", 503: b"Service Unavailable"}


class _Helpers:
    """What the fast path and the Quart routes share: CORS, limits, stats, access log."""

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        self.services = services
        self.stats = ApiStats()
        self.limiter = ClientLimiter(cfg.api.per_client_rps, cfg.api.trusted_proxies)
        self.allowed = set(cfg.server.allowed_origins)
        # The state changes every few seconds: browsers and CDNs may reuse it for 1 s and
        # serve it stale while revalidating for a few more.
        self.state_cache_control = b"public, max-age=1, stale-while-revalidate=5"
        ttl = max(1, int(cfg.cache.ttl))
        self.price_cache_control = f"public, max-age={ttl}, stale-while-revalidate={2 * ttl}"
        self.rate_limited_body = error_body("rate_limited", f"over {cfg.api.per_client_rps:g} requests/s per client")
        # Price bodies the app built, kept while the price cache still holds them fresh,
        # so the front door can answer repeats without the framework: mint -> (body, etag, expires).
        self.price_ttl = cfg.cache.method_ttls.get("price", cfg.cache.ttl)
        self.price_bodies: cachetools.TLRUCache[str, tuple[bytes, str, float]] = cachetools.TLRUCache(
            maxsize=10_000, ttu=lambda _mint, entry, _now: entry[2], timer=trio.current_time
        )

    def origin_allowed(self, origin: str | None) -> bool:
        return origin is not None and (not self.allowed or origin in self.allowed)

    def cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if not self.origin_allowed(origin):
            return []
        value = b"*" if not self.allowed else origin.encode("latin-1")  # type: ignore[union-attr]
        return [(b"access-control-allow-origin", value), (b"vary", b"Origin")]

    def price_body(self, mint: str, cached: Cached[float | None]) -> tuple[bytes, str]:
        """The GET /api/price body and ETag; kept for the front door while still fresh."""
        last_update = int(time.time() * 1000 - cached.age * 1000)
        body = json.dumps({"mint": mint, "price": cached.value, "lastUpdate": last_update, "stale": cached.stale},
                          separators=(",", ":")).encode()
        etag = _etag(body)
        if not cached.stale and self.price_ttl - cached.age > 0:
            self.price_bodies[mint] = (body, etag, trio.current_time() + self.price_ttl - cached.age)
        return body, etag

    def preflight_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if not self.origin_allowed(origin):
            return []
        return [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"content-type, if-none-match, solana-client"),  # web3.js sends solana-client
            (b"access-control-max-age", b"600"),
        ]

    def allow(self, client: str | None, forwarded_for: str | None) -> bool:
        if self.limiter.rps <= 0:
            return True
        if self.limiter.allow(self.limiter.client_address(client, forwarded_for)):
            return True
        self.stats.rate_limited += 1
        return False

    def record(self, method: str, route: str, client: str | None, status: int, started: float,
               path: str | None = None) -> None:
        """Count a finished request (and log it when the access log is on)."""
        elapsed = trio.current_time() - started
        self.stats.record(route, status, elapsed, from_memory=route in _IN_MEMORY_ROUTES and status < 400)
        if not access_log.disabled and access_log.isEnabledFor(logging.INFO):
            access_log.info('%s "%s %s" %d %.1fms', client, method, path or route, status, elapsed * 1000)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type=JSON, headers=headers)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(code, message), status=status, content_type=JSON, headers=headers)


class BadInput(Exception):
    """A 4xx answer for bad client input."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _pubkey(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadInput(400, "invalid_pubkey", f"{field}: expected a base58 public key string, got {type(value).__name__}")
    try:
        Pubkey.from_string(value)
    except ValueError as exc:
        raise BadInput(400, "invalid_pubkey", f"{field}: not a valid public key ({exc}): {value[:64]!r}") from None
    return value


def _parse_balances_body(raw: bytes, max_wallets: int) -> tuple[list[str], str]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadInput(400, "invalid_json", 'body is not JSON: expected {"wallets": [...], "tokenMint": "..."}') from None
    if not isinstance(body, dict):
        raise BadInput(400, "invalid_body", 'expected a JSON object {"wallets": [...], "tokenMint": "..."}')
    unknown = set(body) - {"wallets", "tokenMint"}
    if unknown:
        raise BadInput(400, "invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
    wallets = body.get("wallets")
    if not isinstance(wallets, list):
        raise BadInput(400, "invalid_body", "wallets: expected a list of public keys")
    if len(wallets) > max_wallets:
        raise BadInput(413, "too_many_wallets", f"wallets: at most {max_wallets} per request, got {len(wallets)}")
    mint = _pubkey(body.get("tokenMint"), "tokenMint")
    return [_pubkey(w, f"wallets[{i}]") for i, w in enumerate(wallets)], mint


def create_app(services: Services) -> FastPath:
    """The ASGI app of the server (fast path + Quart-Trio routes)."""
    cfg = services.cfg
    helpers = _Helpers(services)
    app = QuartTrio("edgestate")
    app.config["MAX_CONTENT_LENGTH"] = cfg.api.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    services.extra_stats["api"] = helpers.stats.stats

    @app.before_request
    async def _before() -> Response | None:
        g.started = trio.current_time()
        if request.method == "OPTIONS":
            return None
        if request.path.startswith("/api/") and not helpers.allow(
            request.remote_addr, request.headers.get("x-forwarded-for")
        ):
            return Response(helpers.rate_limited_body, status=429, content_type=JSON, headers={"retry-after": "1"})
        return None

    @app.after_request
    async def _after(response: Response) -> Response:
        origin = request.headers.get("origin")
        for name, value in helpers.cors_headers(origin):
            response.headers[name.decode()] = value.decode()
        if request.method == "OPTIONS":
            for name, value in helpers.preflight_headers(origin):
                response.headers[name.decode()] = value.decode()
        if response.status_code == 304:
            response.headers.pop("content-type", None)  # Quart adds text/html (STACK-NOTES)
        rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
        helpers.record(request.method, rule, request.remote_addr, response.status_code,
                       g.get("started", trio.current_time()), request.path)
        return response

    @app.errorhandler(BadInput)
    async def _bad_input(exc: BadInput) -> Response:
        return _error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        message = {404: f"no route {request.path}", 405: f"{request.method} not allowed on {request.path}",
                   413: f"request body over {cfg.api.max_body_bytes} bytes"}.get(exc.code or 0, exc.description or code)
        headers = {"allow": ", ".join(exc.valid_methods)} if getattr(exc, "valid_methods", None) else None  # type: ignore[attr-defined]
        return _error(exc.code or 500, code, message, headers)

    @app.errorhandler(EdgeStateError)
    async def _upstream_error(exc: EdgeStateError) -> Response:
        if isinstance(exc, (Overloaded, RateLimited)):
            retry = str(max(1, round(exc.retry_after)))
            status = 503 if isinstance(exc, Overloaded) else 429
            return _error(status, "overloaded" if status == 503 else "rate_limited", str(exc), {"retry-after": retry})
        if isinstance(exc, UpstreamTimeout):
            return _error(504, "upstream_timeout", f"upstream did not answer in time: {exc}")
        return _error(502, "upstream_error", f"upstream failed and nothing is cached: {exc}")

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return _error(500, "internal_error", "internal error (logged on the server)")

    @app.get("/health")
    async def health() -> Response:
        return _json({
            "status": "ok",
            "version": __version__,
            "uptime_s": round(trio.current_time() - services.started_at, 3),
            "websocket_clients": len(services.hub),
            "state_version": services.state.snapshot.version,
        })

    @app.get("/ready")
    async def ready() -> Response:
        ok, reason = services.state.ready()
        stale = services.state.stale_fields()
        if ok:
            return _json({"status": "ready", "state_version": services.state.snapshot.version})
        return _json({"status": "not_ready", "reason": reason, "stale": stale}, 503, {"retry-after": "1"})

    @app.get("/stats")
    async def stats() -> Response:
        from . import workers  # deferred: workers imports the server, which imports this module

        # ?scope=all in a worker group: every member's figures (workers.py), else this process's.
        doc = (workers.collect_all(services) if request.args.get("scope") == "all" else None) or metrics.collect(
            services
        )
        return Response(json.dumps(doc, indent=2, default=str), content_type=JSON,
                        headers={"cache-control": "no-store"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.prometheus_text(services), content_type="text/plain; version=0.0.4; charset=utf-8",
                        headers={"cache-control": "no-store"})

    @app.get("/api/price/<mint>")
    async def price(mint: str) -> Response:
        _pubkey(mint, "tokenMint")
        cached = await services.prices.get_price(mint)
        if cached.value is None:
            return _error(404, "no_price", f"the price API has no price for {mint}")
        body, etag = helpers.price_body(mint, cached)
        headers = {"etag": etag, "cache-control": helpers.price_cache_control}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(b"", status=304, headers=headers)
        return Response(body, content_type=JSON, headers=headers)

    @app.post("/api/tokens/balances")
    async def balances() -> Response:
        if (request.content_length or 0) > cfg.api.max_body_bytes:
            return _error(413, "body_too_large", f"request body over {cfg.api.max_body_bytes} bytes")
        raw = cast(bytes, await request.get_data(as_text=False))
        wallets, mint = _parse_balances_body(raw, cfg.api.max_wallets)
        try:
            result = await services.rpc.get_token_balances(wallets, mint)
        except InvalidMint as exc:
            raise BadInput(400, "invalid_mint", f"tokenMint: {exc}") from None
        return _json({"balances": result}, headers={"cache-control": "no-store"})

    if services.rpc_proxy is not None:  # POST /rpc (issue 12): the JSON-RPC proxy, rpc/proxy.py
        rpc_proxy = services.rpc_proxy

        @app.post("/rpc")
        async def rpc() -> Response:
            if (request.content_length or 0) > cfg.api.max_body_bytes:
                return _json({"jsonrpc": "2.0", "error": {"code": -32600, "message": f"request body over {cfg.api.max_body_bytes} bytes"}, "id": None}, 413)
            origin = request.headers.get("origin")
            if origin is not None and not helpers.origin_allowed(origin):  # as /ws: a browser page of another site
                return _json({"jsonrpc": "2.0", "error": {"code": -32600, "message": f"origin {origin[:100]!r} is not allowed"}, "id": None}, 403)
            client = helpers.limiter.client_address(request.remote_addr, request.headers.get("x-forwarded-for"))
            status, headers, body = await rpc_proxy.proxy.handle(cast(bytes, await request.get_data(as_text=False)), client)
            return Response(body, status=status, headers=dict(headers))

    return FastPath(app, services, helpers)
