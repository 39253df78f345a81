"""Feed mode: take the state from a parent edgestate instead of the providers.

With ``upstream.parent`` set, a node is a *child*: it never talks to the providers.

    feed.run
    ├── follow          the parent's public /ws: every ``stateUpdate`` → SharedState;
    │                   reconnects with jittered backoff, falls back along the parent list
    └── confirm         while the parent is connected and fresh, re-confirms the fields
                        (the parent only sends changes) and republishes staleness flips

Lookups the snapshot cannot answer (``/api/price/{mint}``, ``POST /api/tokens/balances``)
are forwarded to the parent's HTTP API by :class:`ParentPrices` and :class:`ParentRpc`,
through the child's own :class:`~edgestate.cache.Cache`: concurrent and repeated asks for
the same thing within the TTL cost the parent one request, whatever the number of clients.

Ordering: within one parent connection a ``stateUpdate`` whose ``version`` is not newer
than the last one seen is ignored. The first message of every new connection is adopted as
is (``force``), slot included: a fallback parent may be a few slots behind the lost one.

Readiness: losing the parent does not make /ready fail at once. The child keeps serving the
last state, and its fields go stale ``state.max_staleness`` after the last confirmation from
a connected, fresh parent; then /ready answers 503 naming them. A parent restart shorter
than that does not take every child out of a load balancer at the same moment.
"""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from solders.pubkey import Pubkey

from .cache import Cache, Cached, cache_key
from .config import Config, redact
from .errors import Overloaded, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .state import FIELDS, LAMPORTS_PER_SOL, SharedState
from .upstream.ratelimit import Priority
from .upstream.rpc import InvalidMint
from .wsconnect import backoff_delay, json_object, network_failure, open_websocket

log = logging.getLogger("edgestate.feed")

_CONNECT_TIMEOUT = 10.0
_MAX_MESSAGE = 1 << 16  # a stateUpdate is ~200 bytes
_BACKOFF_BASE, _BACKOFF_CAP = 0.25, 10.0
_CONFIRM_EVERY = 1.0


class ParentProtocolError(Exception):
    """The parent's /ws sent something that is not a ``stateUpdate`` we can read."""


@dataclass(frozen=True, slots=True)
class Parent:
    """One parent edgestate: its WebSocket URL and the base URL of its HTTP API."""

    ws_url: str
    http_url: str

    @classmethod
    def from_url(cls, url: str) -> Parent:
        """Accept ``ws(s)://host:port/ws`` or ``http(s)://host:port[/prefix]``.

        A WebSocket URL's HTTP API is the same origin with the trailing ``/ws`` removed;
        an HTTP URL's WebSocket is ``<url>/ws``.
        """
        parts = urllib.parse.urlsplit(url)
        path = parts.path.rstrip("/")
        if parts.scheme in ("ws", "wss"):
            http_scheme = "https" if parts.scheme == "wss" else "http"
            base = path.removesuffix("/ws")
            ws_path = path or "/ws"
            ws_scheme = parts.scheme
        else:
            http_scheme = parts.scheme
            base = path
            ws_path = path + "/ws"
            ws_scheme = "wss" if parts.scheme == "https" else "ws"
        ws_url = urllib.parse.urlunsplit((ws_scheme, parts.netloc, ws_path, parts.query, ""))
        http_url = urllib.parse.urlunsplit((http_scheme, parts.netloc, base, "", ""))
        return cls(ws_url, http_url)


class ParentFeed:
    """Follows a parent edgestate's /ws into ``state``; the child's link to its parent.

    Args:
        cfg: ``upstream.parent`` (one URL or a fallback list), ``upstream.request_timeout``
            and ``upstream.max_connections`` (forwarded lookups), ``ws.ping_interval``
            (keepalive towards the parent).
        state: the child's shared state, written with ``source="parent"``.
    """

    def __init__(self, cfg: Config, state: SharedState) -> None:
        if not cfg.upstream.parent:
            raise ValueError("ParentFeed needs upstream.parent")
        self._cfg = cfg
        self._state = state
        self.parents = [Parent.from_url(u) for u in cfg.upstream.parent]
        self._index = 0
        self._client: httpx.AsyncClient | None = None
        self._parent_stale = True
        self._adopted = False
        self.connected = False
        self.connects = 0
        self.reconnects = 0
        self.updates_applied = 0
        self.ignored_older = 0
        self.last_update_at: float | None = None
        self.last_error: str | None = None
        self.forwarded = 0
        self.forward_errors = 0

    @property
    def parent(self) -> Parent:
        """The parent followed now (or tried next)."""
        return self.parents[self._index]

    def __repr__(self) -> str:
        return f"<ParentFeed {redact(self.parent.ws_url)} connected={self.connected} applied={self.updates_applied}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the parent until cancelled; forwarded lookups work once started."""
        up = self._cfg.upstream
        limits = httpx.Limits(max_connections=up.max_connections)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(up.request_timeout)) as client:
            self._client = client
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._follow)
                    nursery.start_soon(self._confirm)
                    task_status.started()
            finally:
                self._client = None

    # -- the state stream ----------------------------------------------------------

    async def _follow(self) -> None:
        failures = 0
        while True:
            parent = self.parent
            self._adopted = False
            try:
                await self._session(parent)
            except BaseException as exc:
                error = network_failure(exc, (ParentProtocolError,))
                if error is None:
                    raise
                self.last_error = f"{type(error).__name__}: {redact(str(error))}"[:200]
                # Once per outage at WARNING; the retries every few seconds at DEBUG.
                level = logging.WARNING if failures == 0 else logging.DEBUG
                log.log(level, "parent %s: %s (retrying with backoff)", redact(parent.ws_url), self.last_error)
            finally:
                if self.connected:
                    self.connected = False
                    log.warning("parent %s lost: serving the last state until it is back", redact(parent.ws_url))
            if self._adopted:
                failures = 0  # it worked: try the same parent again first
            else:
                failures += 1
                self._index = (self._index + 1) % len(self.parents)  # the next parent, if any
            self.reconnects += 1
            await trio.sleep(backoff_delay(failures, _BACKOFF_BASE, _BACKOFF_CAP))

    async def _session(self, parent: Parent) -> None:
        """One connection, until it fails; sets ``_adopted`` once the parent's state is taken."""
        async with open_websocket(
            parent.ws_url, message_queue_size=4, max_message_size=_MAX_MESSAGE,
            ping_interval=self._cfg.ws.ping_interval, connect_timeout=_CONNECT_TIMEOUT,
        ) as conn:
            last_version: int | None = None
            while True:
                message = _loads(await conn.get_message())
                state = message.get("state")
                if message.get("type") != "stateUpdate" or not isinstance(state, dict):
                    continue
                version = state.get("version")
                if not isinstance(version, int) or isinstance(version, bool):
                    raise ParentProtocolError(f"stateUpdate without an integer version: {version!r}")
                if last_version is not None and version <= last_version:
                    self.ignored_older += 1
                    continue
                self.apply(state, first=last_version is None)
                last_version = version
                if not self._adopted:
                    self._adopted = True
                    self.connected = True
                    self.connects += 1
                    log.info("following parent %s (version %d)", redact(parent.ws_url), version)

    def apply(self, state: dict[str, Any], *, first: bool = False) -> int:
        """Write a parent's ``stateUpdate`` state into the local state; fields written.

        ``first``: the first message of a connection, adopted whatever its slot. While the
        parent itself says ``stale``, unchanged values are not re-confirmed (they would
        look fresh here when they are not there); changed values are taken.
        """
        slot = state.get("slot")
        slot = slot if isinstance(slot, int) and not isinstance(slot, bool) and slot >= 0 else 0
        self._parent_stale = bool(state.get("stale"))
        jackpot = _number(state.get("jackpot"))  # SOL; stored in lamports
        values = {
            "tokenPrice": _number(state.get("tokenPrice")),
            "jackpot": None if jackpot is None else round(jackpot * LAMPORTS_PER_SOL),
            "participants": _integer(state.get("participants")),
        }
        take = {}
        for name, value in values.items():
            if value is None:  # the parent has no data for it yet: nothing to confirm
                continue
            held = self._state.field(name)
            if self._parent_stale and held is not None and held.value == value:
                continue
            take[name] = value
        self._state.update_many(take, slot=slot, source="parent", force=first)  # one publication
        self.updates_applied += 1
        self.last_update_at = trio.current_time()
        return len(take)

    async def _confirm(self) -> None:
        while True:
            await trio.sleep(_CONFIRM_EVERY)
            if self.connected and not self._parent_stale:
                for name in FIELDS:
                    held = self._state.field(name)
                    if held is not None:  # same value, same slot: a confirmation, no publication
                        self._state.update(name, held.value, slot=held.slot, source="parent")
            self._state.refresh_staleness()

    # -- forwarded lookups ----------------------------------------------------------

    async def request(self, method: str, path: str, *, body: Any = None) -> httpx.Response:
        """One request to the current parent's HTTP API (``path`` starts with ``/``).

        Returns the response for 2xx and 4xx other than 429 (the caller reads the error code).

        Raises:
            UpstreamTimeout: no answer within ``upstream.request_timeout``, or the parent's 504.
            UpstreamUnavailable: the parent cannot be reached (or the feed is not running).
            Overloaded: the parent answered 429 or 503 (``retry_after`` from its header).
            UpstreamError: any other 5xx.
        """
        client = self._client
        base = self.parent.http_url
        if client is None:
            raise UpstreamUnavailable("the parent feed is not running")
        self.forwarded += 1
        try:
            response = await client.request(method, base + path, json=body)
        except httpx.TimeoutException as exc:
            self.forward_errors += 1
            raise UpstreamTimeout(f"parent {redact(base)}: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:
            self.forward_errors += 1
            raise UpstreamUnavailable(f"parent {redact(base)}: {type(exc).__name__}: {redact(str(exc))}") from None
        status = response.status_code
        if status < 500 and status != 429:
            return response
        self.forward_errors += 1
        message = f"parent {redact(base)} answered {status}: {_error_message(response)}"
        if status in (429, 503):
            raise Overloaded(message, retry_after=_retry_after(response))
        if status == 504:
            raise UpstreamTimeout(message)
        raise UpstreamError(message)

    def stats(self) -> dict[str, Any]:
        """The ``feed`` section of /stats."""
        now = trio.current_time()
        return {
            "parent": redact(self.parent.ws_url),
            "parents": [redact(p.ws_url) for p in self.parents],
            "connected": self.connected,
            "parent_stale": self._parent_stale,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "updates_applied": self.updates_applied,
            "ignored_older": self.ignored_older,
            "last_update_age_s": None if self.last_update_at is None else round(now - self.last_update_at, 3),
            "last_error": self.last_error,
            "forwarded_requests": self.forwarded,
            "forward_errors": self.forward_errors,
        }


class ParentPrices:
    """``/api/price/{mint}`` answered by the parent, through the child's cache.

    Duck-types :class:`~edgestate.upstream.prices.PriceClient` for the HTTP app.
    """

    def __init__(self, feed: ParentFeed, cache: Cache) -> None:
        self._feed = feed
        self._cache = cache
        self.lookups = 0

    async def get_price(
        self, mint: str, *, priority: Priority = Priority.USER, refresh: bool = False
    ) -> Cached[float | None]:
        """The parent's USD price of ``mint`` (``value`` None: the parent has none).

        ``age`` adds the parent's own age of the value to the time it sat here.

        Raises:
            ValueError: ``mint`` is not a base58 public key.
            UpstreamError / Overloaded: the parent failed and nothing usable is cached.
        """
        Pubkey.from_string(mint)
        key = cache_key("parent.price", [mint])
        if refresh:
            self._cache.invalidate(key)
        self.lookups += 1

        async def fetch() -> tuple[float | None, float, bool]:
            response = await self._feed.request("GET", f"/api/price/{mint}")
            if response.status_code == 404 and _error_code(response) == "no_price":
                return None, 0.0, False
            if response.status_code != 200:
                raise UpstreamError(f"parent answered {response.status_code}: {_error_message(response)}")
            body = _json_object(response)
            price = _number(body.get("price"))
            last_update = _number(body.get("lastUpdate"))
            if price is None:
                raise UpstreamError("parent answered a price that is not a number")
            age = max(0.0, time.time() - last_update / 1000) if last_update is not None else 0.0
            return float(price), age, bool(body.get("stale"))

        cached = await self._cache.get_or_fetch(key, fetch)
        price, parent_age, parent_stale = cached.value
        return Cached(price, cached.age + parent_age, cached.stale or parent_stale)

    def stats(self) -> dict[str, Any]:
        return {"source": "parent", "lookups": self.lookups}


class ParentRpc:
    """``POST /api/tokens/balances`` answered by the parent, through the child's cache.

    Duck-types :class:`~edgestate.upstream.rpc.SolanaRpc`'s ``get_token_balances``.
    """

    def __init__(self, feed: ParentFeed, cache: Cache) -> None:
        self._feed = feed
        self._cache = cache
        self.lookups = 0

    async def get_token_balances(
        self, wallets: Sequence[str], mint: str, *, priority: Priority = Priority.USER
    ) -> dict[str, float]:
        """UI token balances of ``wallets`` for ``mint``, as the parent answers them.

        Raises:
            InvalidMint: the parent says the mint is not a token mint.
            UpstreamError / Overloaded: the parent failed (a stale answer is served
                instead while one younger than ``cache.max_stale`` exists).
        """
        wallets = list(wallets)
        key = cache_key("parent.balances", [wallets, mint])
        self.lookups += 1

        async def fetch() -> dict[str, float]:
            response = await self._feed.request(
                "POST", "/api/tokens/balances", body={"wallets": wallets, "tokenMint": mint}
            )
            if response.status_code == 400 and _error_code(response) == "invalid_mint":
                raise InvalidMint(_error_message(response).removeprefix("tokenMint: "))
            if response.status_code != 200:
                raise UpstreamError(f"parent answered {response.status_code}: {_error_message(response)}")
            balances = _json_object(response).get("balances")
            if not isinstance(balances, dict):
                raise UpstreamError("parent answered balances that are not an object")
            return {str(k): float(v) for k, v in balances.items() if _number(v) is not None}

        result: dict[str, float] = (await self._cache.get_or_fetch(key, fetch)).value
        return dict(result)

    def stats(self) -> dict[str, Any]:
        return {"source": "parent", "lookups": self.lookups}


# -- helpers ---------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _integer(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise UpstreamError(f"parent answered {response.status_code} with a body that is not JSON") from None
    if not isinstance(body, dict):
        raise UpstreamError(f"parent answered {response.status_code} with JSON that is not an object")
    return body


def _error_field(response: httpx.Response, name: str) -> str:
    try:
        error = response.json().get("error") or {}
        return str(error.get(name) or "")
    except (ValueError, AttributeError):
        return ""


def _error_code(response: httpx.Response) -> str:
    return _error_field(response, "code")


def _error_message(response: httpx.Response) -> str:
    return _error_field(response, "message")[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(1.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _loads(text: str | bytes) -> dict[str, Any]:
    return json_object(text, ParentProtocolError, "parent")


