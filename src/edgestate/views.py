"""The in-memory answers: state, lottery views and prices, without any framework.

The routes every browser and CDN polls are answered by the front door from bodies built
once per change (or, for a price, once per fetch) and sent in one write: h11, ASGI and
the framework are ~95% of the cost of such a request (docs/benchmarks.md). What the
Quart app (api.py) and these answers share lives here too: CORS, the per-client limit,
the error mapping, request statistics and the access log.
"""

from __future__ import annotations

import collections
import email.utils
import ipaddress
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import cachetools
import trio
from solders.pubkey import Pubkey

from .cache import Cached
from .errors import EdgeStateError, Overloaded, RateLimited, UpstreamTimeout
from .limits import PRICE_COST, LookupLimiter, balances_cost
from .origins import OriginPolicy
from .state import Snapshot, etag_of
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .services import Services

access_log = logging.getLogger("edgestate.access")

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, bytes, Headers]

JSON_TYPE = (b"content-type", b"application/json")
MEMORY_ROUTES = frozenset({"/api/state", "/api/lottery/state", "/api/lottery/participants/count"})
PRICE_PREFIX = "/api/price/"
PRICE_ROUTE = "/api/price/<mint>"

REASONS = {200: b"OK", 204: b"No Content", 304: b"Not Modified", 400: b"Bad Request", 403: b"Forbidden",
           404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
           426: b"Upgrade Required", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable",
           504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


def error_body(code: str, message: str) -> bytes:
    """The contract's error body: ``{"error": {"code", "message"}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def upstream_error_answer(exc: EdgeStateError) -> tuple[int, str, str, dict[str, str]]:
    """(status, code, message, headers) for an error of the upstream side."""
    if isinstance(exc, (Overloaded, RateLimited)):
        retry = {"retry-after": str(max(1, round(exc.retry_after)))}
        if isinstance(exc, Overloaded):
            return 503, "overloaded", str(exc), retry
        return 429, "rate_limited", str(exc), retry
    if isinstance(exc, UpstreamTimeout):
        return 504, "upstream_timeout", f"upstream did not answer in time: {exc}", {}
    return 502, "upstream_error", f"upstream failed and nothing is cached: {exc}", {}


def raw_response(status: int, body: bytes, headers: Headers, *, date: bytes, close: bool, head_only: bool) -> bytes:
    """A whole HTTP/1.1 response (head and body) as one byte string."""
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"")), b"date: " + date, b"server: edgestate"]
    lines += [name + b": " + value for name, value in headers]
    if status not in (204, 304):
        lines.append(b"content-length: %d" % len(body))
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only or status in (204, 304) else body)


def error_response(status: int, code: str, message: str, *, date: bytes, extra: Headers | None = None) -> bytes:
    """A JSON error answer that closes the connection (refusals before any route ran)."""
    headers = [JSON_TYPE, *(extra or [])]
    return raw_response(status, error_body(code, message), headers, date=date, close=True, head_only=False)


class HttpDate:
    """The Date header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class ApiStats:
    """Requests by route and status, latency percentiles, request rate.

    Args:
        telemetry: where /metrics counts the same requests (route, status, duration).
    """

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self.telemetry = telemetry if telemetry is not None else Telemetry()
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
        self.telemetry.http_requests.inc(route, str(status))
        self.telemetry.http_duration.observe(seconds, route)

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

    def is_trusted(self, peer: str) -> bool:
        """Whether ``peer`` is a trusted proxy (its X-Forwarded-For is believed)."""
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client's address; X-Forwarded-For only when the peer is a trusted proxy.

        Read from the right: each trusted proxy appends the address it got the request
        from, so the first address that is not a trusted proxy is the client. Whatever
        is left of it was written by the client itself and proves nothing.
        """
        peer = peer or "?"
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for[-1024:].split(",")]
        for hop in reversed(hops):
            if hop and not self.is_trusted(hop):
                return hop
        return next((hop for hop in hops if hop), peer)

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


class Views:
    """The in-memory answers, and what the app shares with them.

    Bodies derived from the state are rebuilt once per state version; a price body is
    kept while the price cache holds it fresh.
    """

    def __init__(self, services: Services) -> None:
        cfg = services.cfg
        self.services = services
        self.stats = ApiStats(services.telemetry)
        self.limiter = ClientLimiter(cfg.api.per_client_rps, cfg.api.trusted_proxies)
        # Each client's share of the upstream budget for the lookup routes (limits.py).
        self.lookups = LookupLimiter(cfg.api.lookup_per_client_rps, max_cost=balances_cost(cfg.api.max_wallets))
        self.origins = OriginPolicy(cfg.server.allowed_origins)
        # Cache-safe CORS (a CDN may store an answer made for one origin, or for none, and
        # serve it to another): with any origin allowed, "*" on every response, whatever
        # the request had; with a list, the origin echoed and Vary: Origin on every response.
        # A page must read ETag (to poll with If-None-Match) and Retry-After: CORS hides
        # every response header but a few unless they are exposed.
        self._expose: Headers = [(b"access-control-expose-headers", b"ETag, Retry-After")]
        self._cors_any: Headers = [(b"access-control-allow-origin", b"*"), *self._expose]
        self._cors_vary: Headers = [(b"vary", b"Origin")]
        # The state changes every few seconds: browsers and CDNs may reuse it for 1 s and
        # serve it stale while revalidating for a few more.
        self.state_cache_control = b"public, max-age=1, stale-while-revalidate=5"
        ttl = max(1, int(cfg.cache.ttl))
        self.price_cache_control = f"public, max-age={ttl}, stale-while-revalidate={2 * ttl}"
        self.rate_limited_body = error_body("rate_limited", f"over {cfg.api.per_client_rps:g} requests/s per client")
        self.price_ttl = cfg.cache.method_ttls.get("price", cfg.cache.ttl)
        # mint -> (body, etag, expires): repeats are answered without the price client.
        self.price_bodies: cachetools.TLRUCache[str, tuple[bytes, str, float]] = cachetools.TLRUCache(
            maxsize=10_000, ttu=lambda _mint, entry, _now: entry[2], timer=trio.current_time
        )
        self._version = -1
        self._bodies: dict[str, tuple[bytes, str] | None] = {}

    # -- routing ---------------------------------------------------------------------

    @staticmethod
    def is_memory_route(path: str) -> bool:
        """Whether the front door answers ``path`` itself (no query string)."""
        return path in MEMORY_ROUTES or (path.startswith(PRICE_PREFIX) and "/" not in path[len(PRICE_PREFIX):])

    async def answer(self, method: str, path: str, headers: dict[str, str], client: str) -> Answer:
        """(status, body, headers) of an in-memory route; a price may be fetched once."""
        started = trio.current_time()
        if path.startswith(PRICE_PREFIX):
            status, body, extra = await self._price(method, path[len(PRICE_PREFIX):], headers, client)
            route = PRICE_ROUTE
        else:
            status, body, extra = self.respond(method, path, headers, client)
            route = path
        self.record(method, route, client, status, started, path)
        return status, body, extra

    def respond(self, method: str, path: str, headers: dict[str, str], client: str) -> Answer:
        """(status, body, headers) of a state-derived route; never waits."""
        origin = headers.get("origin")
        if method in ("GET", "HEAD"):
            status, body, extra = self._state_answer(path, headers, client)
        elif method == "OPTIONS":
            status, body, extra = 204, b"", self.preflight_headers(origin)
        else:
            status, body, extra = self._not_allowed(method, path)
        return status, body, extra + self.cors_headers(origin)

    # -- answers ---------------------------------------------------------------------

    def _not_allowed(self, method: str, path: str) -> Answer:
        body = error_body("method_not_allowed", f"{method} not allowed on {path}")
        return 405, body, [JSON_TYPE, (b"allow", b"GET, HEAD, OPTIONS")]

    def _rate_limited(self) -> Answer:
        return 429, self.rate_limited_body, [JSON_TYPE, (b"retry-after", b"1")]

    def _state_answer(self, path: str, headers: dict[str, str], client: str) -> Answer:
        if not self.allow(client, headers.get("x-forwarded-for")):
            return self._rate_limited()
        entry = self._state_body(self.services.state.snapshot, path)
        if entry is None:
            body = error_body("not_ready", "no participant count from upstream yet; retry shortly")
            return 503, body, [JSON_TYPE, (b"retry-after", b"1")]
        body, etag = entry
        cache = [(b"etag", etag.encode()), (b"cache-control", self.state_cache_control)]
        if etag_matches(headers.get("if-none-match"), etag):
            return 304, b"", cache
        return 200, body, [JSON_TYPE, *cache]

    async def _price(self, method: str, mint: str, headers: dict[str, str], client: str) -> Answer:
        origin = headers.get("origin")
        cors = self.cors_headers(origin)
        if method == "OPTIONS":
            return 204, b"", self.preflight_headers(origin) + cors
        if method not in ("GET", "HEAD"):
            status, body, extra = self._not_allowed(method, PRICE_PREFIX + mint)
            return status, body, extra + cors
        if not self.allow(client, headers.get("x-forwarded-for")):
            status, body, extra = self._rate_limited()
            return status, body, extra + cors
        entry = self.price_bodies.get(mint)
        if entry is None and self.price_would_fetch(mint):  # only a lookup that costs upstream is charged
            limited = self.lookup_refused(client, headers.get("x-forwarded-for"), PRICE_COST)
            if limited is not None:
                status, body, extra = limited
                return status, body, extra + cors
        if entry is None:
            refused, body, etag = await self._fetch_price(mint)
            if refused is not None:
                status, error, extra = refused
                return status, error, extra + cors
        else:
            body, etag, _expires = entry
        cache = [(b"etag", etag.encode()), (b"cache-control", self.price_cache_control.encode())]
        if etag_matches(headers.get("if-none-match"), etag):
            return 304, b"", cache + cors
        return 200, body, [JSON_TYPE, *cache, *cors]

    def price_would_fetch(self, mint: str) -> bool:
        """Whether looking ``mint`` up now costs upstream (True when the client cannot tell)."""
        would_fetch = getattr(self.services.prices, "would_fetch", None)  # ParentPrices has none
        return bool(would_fetch(mint)) if would_fetch is not None else True

    def charge_lookup(self, client: str | None, forwarded_for: str | None, cost: float) -> None:
        """Take ``cost`` from the client's lookup share (``api.lookup_per_client_rps``).

        Raises:
            RateLimited: the share does not cover it (429 + Retry-After).
        """
        try:
            self.lookups.charge(self.limiter.client_address(client, forwarded_for), cost)
        except RateLimited:
            self.stats.rate_limited += 1
            raise

    def lookup_refused(self, client: str | None, forwarded_for: str | None, cost: float) -> Answer | None:
        """:meth:`charge_lookup`, with None when admitted and the 429 answer when not."""
        try:
            self.charge_lookup(client, forwarded_for, cost)
        except RateLimited as exc:
            status, code, message, extra = upstream_error_answer(exc)
            return status, error_body(code, message), [JSON_TYPE, *((k.encode(), v.encode()) for k, v in extra.items())]
        return None

    async def _fetch_price(self, mint: str) -> tuple[Answer | None, bytes, str]:
        """(None, body, ETag) of a price fetched once, or (the error answer, b"", "")."""
        try:
            Pubkey.from_string(mint)
        except ValueError as exc:
            message = f"tokenMint: not a valid public key ({exc}): {mint[:64]!r}"
            return (400, error_body("invalid_pubkey", message), [JSON_TYPE]), b"", ""
        try:
            cached = await self.services.prices.get_price(mint)
        except EdgeStateError as exc:
            status, code, message, extra = upstream_error_answer(exc)
            headers = [JSON_TYPE, *((k.encode(), v.encode()) for k, v in extra.items())]
            return (status, error_body(code, message), headers), b"", ""
        if cached.value is None:
            return (404, error_body("no_price", f"the price API has no price for {mint}"), [JSON_TYPE]), b"", ""
        return (None, *self.price_body(mint, cached))

    def price_body(self, mint: str, cached: Cached[float | None]) -> tuple[bytes, str]:
        """The GET /api/price body and ETag; kept in memory while still fresh."""
        last_update = int(time.time() * 1000 - cached.age * 1000)
        body = json.dumps({"mint": mint, "price": cached.value, "lastUpdate": last_update, "stale": cached.stale},
                          separators=(",", ":")).encode()
        etag = etag_of(body)
        if not cached.stale and self.price_ttl - cached.age > 0:
            self.price_bodies[mint] = (body, etag, trio.current_time() + self.price_ttl - cached.age)
        return body, etag

    def _state_body(self, snapshot: Snapshot, path: str) -> tuple[bytes, str] | None:
        if snapshot.version != self._version:
            self._version = snapshot.version
            self._bodies = self._build(snapshot)
        return self._bodies[path]

    def _build(self, s: Snapshot) -> dict[str, tuple[bytes, str] | None]:
        lottery = self.services.cfg.lottery
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
            count_body = json.dumps({"count": s.participants, "lastUpdate": s.last_update_ms},
                                    separators=(",", ":")).encode()
            count = (count_body, etag_of(count_body))
        return {
            "/api/state": (s.body, s.etag),
            "/api/lottery/state": (lottery_body, etag_of(lottery_body)),
            "/api/lottery/participants/count": count,
        }

    # -- shared with the app ---------------------------------------------------------

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether ``server.allowed_origins`` admits ``origin`` (any, when the list is empty)."""
        return self.origins.allows(origin)

    def cors_headers(self, origin: str | None) -> Headers:
        """The CORS headers of any response to a request with this Origin (None: none sent)."""
        if self.origins.any:
            return self._cors_any
        if origin is not None and self.origins.allows(origin):
            return [(b"access-control-allow-origin", origin.encode("latin-1")), *self._expose, *self._cors_vary]
        return self._cors_vary

    def preflight_headers(self, origin: str | None) -> Headers:
        """The extra headers of an OPTIONS answer (none for a refused origin)."""
        if not self.origins.allows(origin):
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
        self.stats.record(route, status, elapsed, from_memory=route in MEMORY_ROUTES and status < 400)
        if not access_log.disabled and access_log.isEnabledFor(logging.INFO):
            access_log.info('%s "%s %s" %d %.1fms', client, method, path or route, status, elapsed * 1000,
                            extra={"method": method, "path": path or route, "status": status,
                                   "duration_ms": round(elapsed * 1000, 3), "peer": client})
