"""The Quart-Trio app: every route the front door does not answer from memory.

``create_app(services)`` returns an ASGI app for Hypercorn (hypercorn_glue.py): the
in-memory routes are answered by :class:`~edgestate.views.Views` even on this path (a
request with a query string, say), the rest by Quart: health, readiness, stats, metrics,
balances, and prices asked for in ways the front door leaves alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from solders.pubkey import Pubkey
from werkzeug.exceptions import HTTPException

from . import __version__, metrics
from .errors import EdgeStateError
from .limits import PRICE_COST, balances_cost
from .upstream.rpc import InvalidMint
from .views import MEMORY_ROUTES, Views, error_body, etag_matches, upstream_error_answer

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("edgestate.api")

JSON = "application/json"
# Served only on server.internal_bind when it is set.
INTERNAL_ROUTES = frozenset({"/stats", "/metrics", "/status"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class MemoryRoutes:
    """ASGI wrapper: the in-memory routes from :class:`Views`, everything else via Quart."""

    def __init__(self, app: QuartTrio, views: Views) -> None:
        self._app = app
        self.views = views

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if path in INTERNAL_ROUTES and not self.internal_ok(scope):
            # Checked here, not only at the front door: later requests of a keep-alive
            # connection reach Hypercorn without passing the door again.
            await _send_not_found(send, path)
            self.views.record(scope.get("method", "GET"), "(internal only)", (scope.get("client") or ("?", 0))[0],
                              404, trio.current_time(), path)
            return
        if scope["type"] != "http" or path not in MEMORY_ROUTES:
            await self._app(scope, receive, send)  # type: ignore[arg-type]  # ASGI dicts vs Quart's TypedDicts
            return
        started = trio.current_time()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        client = (scope.get("client") or ("?", 0))[0]
        status, body, extra = self.views.respond(scope["method"], path, headers, client)
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
        self.views.record(scope["method"], path, client, status, started)


    def internal_ok(self, scope: Scope) -> bool:
        """Whether an internal route may be answered on the listener ``scope`` came in on."""
        internal = self.views.services.internal_address
        if internal is None:
            return True
        server = scope.get("server")
        if server is None or int(server[1]) != internal[1]:
            return False
        # Bound to a wildcard address, the connection's local address is a concrete one.
        return internal[0] in ("0.0.0.0", "::") or str(server[0]) == internal[0]


async def _send_not_found(send: Send, path: str) -> None:
    body = error_body("not_found", f"no route {path}")
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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


def create_app(services: Services, views: Views | None = None) -> MemoryRoutes:
    """The ASGI app of the server: the in-memory routes (``views``) and the Quart-Trio routes."""
    cfg = services.cfg
    helpers = views if views is not None else Views(services)
    app = QuartTrio("edgestate")
    app.config["MAX_CONTENT_LENGTH"] = cfg.api.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    services.extra_stats.setdefault("api", helpers.stats.stats)

    def charge_lookup(cost: float) -> None:
        """Charge a lookup's upstream cost to its client (RateLimited: 429 + Retry-After)."""
        helpers.charge_lookup(request.remote_addr, request.headers.get("x-forwarded-for"), cost)

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
        status, code, message, headers = upstream_error_answer(exc)
        return _error(status, code, message, headers or None)

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
        # ?scope=all in a worker group: every member's figures (workers.py), else this process's.
        everyone = services.collect_all if request.args.get("scope") == "all" else None
        doc = (everyone() if everyone is not None else None) or metrics.collect(services)
        return Response(json.dumps(doc, indent=2, default=str), content_type=JSON,
                        headers={"cache-control": "no-store"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.prometheus_text(services), content_type="text/plain; version=0.0.4; charset=utf-8",
                        headers={"cache-control": "no-store"})

    status_page = resources.files("edgestate").joinpath("status.html").read_bytes()

    @app.get("/status")
    async def status() -> Response:
        # One file, no external assets: it reads /stats and /ws of the server that served it.
        return Response(status_page, content_type="text/html; charset=utf-8", headers={
            "cache-control": "no-store",
            "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self' ws: wss:; img-src data:",
        })

    @app.get("/api/price/<mint>")
    async def price(mint: str) -> Response:
        _pubkey(mint, "tokenMint")
        if helpers.price_would_fetch(mint):  # a cached or coalesced lookup costs nothing upstream
            charge_lookup(PRICE_COST)
        cached = await services.prices.get_price(mint)
        if cached.value is None:
            return _error(404, "no_price", f"the price API has no price for {mint}")
        body, etag = helpers.price_body(mint, cached)
        headers = {"etag": etag, "cache-control": helpers.price_cache_control}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(b"", status=304, headers=headers)
        return Response(body, content_type=JSON, headers=headers)

    @app.post("/api/tokens/balances")
    async def balances() -> Response:
        if (request.content_length or 0) > cfg.api.max_body_bytes:
            return _error(413, "body_too_large", f"request body over {cfg.api.max_body_bytes} bytes")
        raw = cast(bytes, await request.get_data(as_text=False))
        wallets, mint = _parse_balances_body(raw, cfg.api.max_wallets)
        charge_lookup(balances_cost(len(wallets)))
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

    return MemoryRoutes(app, helpers)
