"""POST /rpc: JSON-RPC 2.0 for the frontend, answered from the cache or through the pool.

:meth:`RpcProxy.handle` takes the raw body and the client's address and returns
``(status, headers, body)``; it knows nothing of the web framework. Per call:

1. allowlist (-32601) and params (-32602) from :mod:`.policy`, before any upstream work;
2. per-client budget (HTTP 429, batch items counted one by one);
3. a read is looked up in the shared :class:`~edgestate.cache.Cache` under
   ``rpc:<method>`` + canonical params + commitment; misses are single-flight and go
   through the shared :class:`~edgestate.upstream.pool.Pool`, which batches them and
   merges getAccountInfo/getBalance into getMultipleAccounts;
4. getSignatureStatuses of all clients within ``rpc.status_window_ms`` (about a slot) are
   merged into calls of at most 256 signatures (:class:`StatusMerger`), each status cached
   on its own;
5. sendTransaction goes through a pool of its own with no retries: forwarded once.

Upstream failures become JSON-RPC errors (the provider's own, or -32603 naming what
failed) within ``upstream.request_timeout``; no URL, key or traceback reaches a client.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools
import trio

from ..cache import Cache, cache_key
from ..config import Config
from ..errors import Overloaded, RpcError, UpstreamError, UpstreamTimeout
from ..upstream.pool import Pool
from ..upstream.ratelimit import RateLimiter
from . import policy
from .policy import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, CacheClass

log = logging.getLogger("edgestate.rpc")

Headers = list[tuple[str, str]]
Execute = Callable[[str, list[Any]], Awaitable[Any]]
_JSON: Headers = [("content-type", "application/json"), ("cache-control", "no-store")]
_URL = re.compile(r"\S+://\S+")
_MAX_TRACKED_METHODS = 64
_SEND_METHODS = frozenset({"sendTransaction", "simulateTransaction"})


def rpc_error(code: int, message: str, req_id: Any = None, data: Any = None) -> dict[str, Any]:
    """A JSON-RPC 2.0 error response object."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": req_id}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def public_message(exc: BaseException | str) -> str:
    """What a client may read of an upstream failure: no URL (it may hold a key)."""
    return _URL.sub("the provider", str(exc))[:300]


class ClientBudget:
    """Token buckets per client address (bounded LRU); ``rate`` 0 = unlimited."""

    def __init__(self, rate: float, *, maxsize: int = 100_000) -> None:
        self.rate = rate
        self._burst = max(1.0, 2 * rate)
        self._buckets: cachetools.LRUCache[str, list[float]] = cachetools.LRUCache(maxsize=maxsize)

    def take(self, client: str, n: float = 1.0) -> bool:
        """Take ``n`` tokens for ``client``; False (nothing taken) when it has too few."""
        if self.rate <= 0:
            return True
        now = trio.current_time()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < n:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - n
        return True


class _Fresh(Exception):
    """Carries an upstream error through the cache so no stale value stands in for it.

    A proxy answer must be what the provider says now (a stale blockhash would make
    transactions fail), so the cache's stale-if-error is not used here.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Window:
    """Signatures collected for one merged getSignatureStatuses call."""

    __slots__ = ("sigs", "full", "done", "results", "error")

    def __init__(self) -> None:
        self.sigs: dict[str, None] = {}
        self.full = trio.Event()
        self.done = trio.Event()
        self.results: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        self.error: BaseException | None = None


class StatusMerger:
    """getSignatureStatuses of many clients, merged into calls of at most 256 signatures.

    Callers asking within one window (``window`` seconds from the first) share the
    upstream calls; a window closes early once it holds 256 signatures. Statuses are
    cached per signature (a finalized one for long, others for about a slot), so polling
    clients of one signature cost one lookup per slot.

    Why a window of about a slot and not the pool's batch window (100 ms): wallets poll
    their signature every second or so, each at its own phase, so one 100 ms window
    catches a tenth of a poll round; a slot-long window catches 256 signatures once
    about 640 polls/s arrive, and a status cannot change faster than a slot anyway.

    Args:
        execute: ``execute(method, params)`` -> result (the pool's).
        cache: where each signature's status is kept.
        window: seconds a window stays open (``rpc.status_window_ms``).
    """

    def __init__(self, execute: Execute, cache: Cache, window: float) -> None:
        self._execute = execute
        self._cache = cache
        self._window = window
        self._open: dict[bool, _Window] = {}
        self._nursery: trio.Nursery | None = None
        self.requested = 0  # signatures asked for by clients
        self.from_cache = 0
        self.upstream_calls = 0
        self.upstream_signatures = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the window tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @staticmethod
    def _key(sig: str, history: bool) -> str:
        return cache_key("rpc:signatureStatus", sig, "history" if history else None)

    async def statuses(self, sigs: list[str], history: bool) -> dict[str, Any]:
        """The getSignatureStatuses result for ``sigs`` (any number, already validated)."""
        self.requested += len(sigs)
        found: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        missing: list[str] = []
        for sig in dict.fromkeys(sigs):
            cached = self._cache.peek(self._key(sig, history))
            if cached is not None:
                found[sig] = cached.value
                self.from_cache += 1
            else:
                missing.append(sig)
        windows: list[_Window] = []
        for sig in missing:
            window = self._window_for(history)
            window.sigs[sig] = None
            if window not in windows:
                windows.append(window)
            if len(window.sigs) >= policy.MAX_SIGNATURE_STATUSES:
                window.full.set()
                del self._open[history]
        for window in windows:
            await window.done.wait()
            if window.error is not None:
                raise window.error
            found.update(window.results)
        if not windows:
            await trio.lowlevel.checkpoint()
        if len(found) < len(set(sigs)):  # the window's task was cancelled (shutdown)
            raise UpstreamError("getSignatureStatuses: the lookup was cancelled")
        contexts = [ctx for _, ctx in found.values() if ctx is not None]
        context = max(contexts, key=lambda c: c.get("slot", 0)) if contexts else {"slot": 0}
        return {"context": context, "value": [found[s][0] for s in sigs]}

    def _window_for(self, history: bool) -> _Window:
        window = self._open.get(history)
        if window is None:
            if self._nursery is None:
                raise UpstreamError("getSignatureStatuses: the proxy is not running")
            window = self._open[history] = _Window()
            self._nursery.start_soon(self._flush, window, history)
        return window

    async def _flush(self, window: _Window, history: bool) -> None:
        with trio.move_on_after(self._window):
            await window.full.wait()
        if self._open.get(history) is window:
            del self._open[history]
        sigs = list(window.sigs)
        config = [{"searchTransactionHistory": True}] if history else []
        try:
            async with trio.open_nursery() as nursery:
                for start in range(0, len(sigs), policy.MAX_SIGNATURE_STATUSES):
                    nursery.start_soon(self._call, window, sigs[start : start + policy.MAX_SIGNATURE_STATUSES],
                                       config, history)
        except BaseExceptionGroup as group:  # an upstream failure: every caller of the window gets it
            matched, rest = group.split(Exception)
            if rest is not None:
                raise
            assert matched is not None
            window.error = matched.exceptions[0]
        except Exception as exc:
            window.error = exc
        finally:
            window.done.set()

    async def _call(self, window: _Window, chunk: list[str], config: list[Any], history: bool) -> None:
        self.upstream_calls += 1
        self.upstream_signatures += len(chunk)
        result = await self._execute("getSignatureStatuses", [chunk, *config])
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, list) or len(value) != len(chunk):
            raise UpstreamError("getSignatureStatuses: unexpected reply shape from the provider")
        context = result.get("context") if isinstance(result.get("context"), dict) else None
        for sig, status in zip(chunk, value):
            final = isinstance(status, dict) and status.get("confirmationStatus") == "finalized"
            ttl = policy.IMMUTABLE_TTL if final else policy.SLOT_TTL
            self._cache.put(self._key(sig, history), (status, context), ttl=ttl)
            window.results[sig] = (status, context)

    def stats(self) -> dict[str, Any]:
        return {
            "signatures_requested": self.requested,
            "signatures_from_cache": self.from_cache,
            "upstream_calls": self.upstream_calls,
            "upstream_signatures": self.upstream_signatures,
        }


@dataclasses.dataclass(slots=True)
class _MethodStats:
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    hits: int = 0
    misses: int = 0
    coalesced: int = 0


class RpcProxy:
    """The JSON-RPC side of /rpc.

    Args:
        cfg: the whole configuration (``rpc``, ``upstream``, ``cache``, ``lottery``).
        pool: the shared upstream pool (reads, simulateTransaction).
        cache: the shared cache.
        limiter: the upstream rate limiter (the send pool pays into it too).
        send_pool: the pool for sendTransaction; default: one built from ``cfg`` with
            no retries and no batching, sharing ``limiter``.
    """

    def __init__(self, cfg: Config, pool: Pool, cache: Cache, limiter: RateLimiter, *,
                 send_pool: Pool | None = None) -> None:
        self._cfg = cfg
        self._pool = pool
        self._cache = cache
        programs = (*cfg.rpc.allowed_programs, cfg.lottery.program_id)
        self.policy = policy.Policy(cfg.rpc.allowed_methods, programs, cfg.cache.ttl)
        # No retry may send a transaction twice: the provider's maxRetries does that job.
        up = dataclasses.replace(cfg.upstream, max_retries=0, max_batch_size=1, batch_window_ms=0,
                                 max_connections=min(4, cfg.upstream.max_connections))
        self._send_pool = send_pool if send_pool is not None else Pool(up, limiter)
        self.statuses = StatusMerger(self._read, cache, cfg.rpc.status_window_ms / 1000)
        self._budget = ClientBudget(cfg.rpc.per_client_rps)
        self._send_budget = ClientBudget(cfg.rpc.send_per_client_rps)
        self._timeout = cfg.upstream.request_timeout
        self._by_account: cachetools.LRUCache[str, set[str]] = cachetools.LRUCache(maxsize=50_000)
        self._methods: dict[str, _MethodStats] = collections.defaultdict(_MethodStats)
        self._n: collections.Counter[str] = collections.Counter()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the send pool and the signature-status merger until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._send_pool.run)
            await nursery.start(self.statuses.run)
            task_status.started()

    # ---- HTTP ----------------------------------------------------------------------

    async def handle(self, body: bytes, client: str) -> tuple[int, Headers, bytes]:
        """Answer one POST /rpc body for ``client`` (its address).

        Returns:
            ``(status, headers, body)``: 200 with JSON-RPC responses (errors included),
            413 for a batch over ``rpc.max_batch``, 429 for a client over its budget.
        """
        self._n["requests"] += 1
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._count("(invalid)", "parse_error")
            return 200, _JSON, _dumps(rpc_error(PARSE_ERROR, "Parse error"))
        items = payload if isinstance(payload, list) else [payload]
        if isinstance(payload, list):
            self._n["batches"] += 1
            if not payload:
                return 200, _JSON, _dumps(rpc_error(INVALID_REQUEST, "Invalid request"))
            if len(payload) > self._cfg.rpc.max_batch:
                self._n["batch_too_large"] += 1
                msg = f"Invalid request: batch of {len(payload)} calls, at most {self._cfg.rpc.max_batch}"
                return 413, _JSON, _dumps(rpc_error(INVALID_REQUEST, msg))
        if not self._budget.take(client, len(items)):
            self._n["rate_limited"] += 1
            msg = f"Too many requests: over {self._cfg.rpc.per_client_rps:g} calls/s for this client"
            return 429, [*_JSON, ("retry-after", "1")], _dumps(rpc_error(429, msg))
        answers: list[dict[str, Any] | None] = [None] * len(items)
        # Cache hits are answered here, in order, without a task each: at 10,000 polling
        # frontends most calls are hits, and a task per hit was most of the proxy's CPU.
        rest = []
        for i, item in enumerate(items):
            answers[i] = self._hit(item)
            if answers[i] is None:
                rest.append(i)
        if rest:
            with trio.move_on_after(self._timeout):
                async with trio.open_nursery() as nursery:
                    for i in rest:
                        nursery.start_soon(self._answer_into, answers, i, items[i], client)
        else:
            await trio.lowlevel.checkpoint()
        for i, item in enumerate(items):
            if answers[i] is None and _has_id(item):  # the whole call ran out of time
                method = _method_name(item)
                self._count(method, "timeout")
                msg = f"Internal error: no answer for {method} within {self._timeout:g}s"
                answers[i] = rpc_error(INTERNAL_ERROR, msg, item.get("id"))
        out = [a for a in answers if a is not None]
        if not isinstance(payload, list):
            return 200, _JSON, _dumps(out[0]) if out else b""
        return 200, _JSON, _dumps(out) if out else b""

    def _hit(self, item: Any) -> dict[str, Any] | None:
        """The answer to ``item`` from the cache, or None: then :meth:`answer` takes it (errors included)."""
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or "id" not in item:
            return None
        method, req_id = item.get("method"), item["id"]
        if method in _SEND_METHODS or not isinstance(method, str) or not _valid_id(req_id):
            return None
        try:
            method, params = self.policy.check(method, item.get("params"))
        except (policy.MethodNotAllowed, policy.InvalidParams):
            return None
        rule = policy.RULES[method].cache
        if rule in (CacheClass.NEVER, CacheClass.SIGNATURES):
            return None
        ttl = self.policy.ttl(method, params)
        if ttl <= 0:
            return None
        key = cache_key("rpc:" + method, params, policy.commitment(params))
        if self._cache.peek(key) is None:
            return None
        cached = self._cache.get(key)  # counted as the cache's hit, as get_or_fetch would
        if cached is None:  # expired between the two reads (the clock runs): the slow path fetches
            return None
        self._methods[method].hits += 1
        self._count(method, "ok")
        return {"jsonrpc": "2.0", "result": cached.value, "id": req_id}

    async def _answer_into(self, answers: list[dict[str, Any] | None], i: int, item: Any, client: str) -> None:
        answers[i] = await self.answer(item, client)

    async def answer(self, item: Any, client: str) -> dict[str, Any] | None:
        """The response object for one JSON-RPC request object (None for a notification)."""
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
            self._count("(invalid)", "invalid_request")
            return rpc_error(INVALID_REQUEST, "Invalid request", item.get("id") if isinstance(item, dict) else None)
        req_id = item.get("id")
        if not _valid_id(req_id):
            self._count("(invalid)", "invalid_request")
            return rpc_error(INVALID_REQUEST, "Invalid request", None)
        method = item["method"]
        try:
            method, params = self.policy.check(method, item.get("params"))
        except policy.MethodNotAllowed:
            self._count("(other)", "method_not_found")
            return rpc_error(METHOD_NOT_FOUND, "Method not found", req_id)
        except policy.InvalidParams as exc:
            self._count(method, "invalid_params")
            return rpc_error(INVALID_PARAMS, str(exc), req_id)
        if "id" not in item:
            self._count(method, "notification")  # JSON-RPC notifications get no answer; not forwarded
            return None
        if method in _SEND_METHODS and not self._send_budget.take(client):
            self._count(method, "rate_limited")
            msg = f"Too many requests: over {self._cfg.rpc.send_per_client_rps:g} {method}/s for this client"
            return rpc_error(429, msg, req_id)
        try:
            result = await self.call(method, params)
        except RpcError as exc:
            self._count(method, "rpc_error")
            return rpc_error(exc.code, public_message(exc.rpc_message), req_id, exc.data)
        except UpstreamTimeout as exc:
            self._count(method, "timeout")
            return rpc_error(INTERNAL_ERROR, f"Internal error: upstream timeout: {public_message(exc)}", req_id)
        except (UpstreamError, Overloaded) as exc:
            self._count(method, "upstream_error")
            return rpc_error(INTERNAL_ERROR, f"Internal error: upstream failed: {public_message(exc)}", req_id)
        self._count(method, "ok")
        return {"jsonrpc": "2.0", "result": result, "id": req_id}

    # ---- one validated call --------------------------------------------------------

    async def call(self, method: str, params: list[Any]) -> Any:
        """The result of one validated, canonical call.

        Raises:
            RpcError: the provider's error for this call.
            UpstreamError: the provider failed (timeout, unavailable, bad reply).
            Overloaded: the upstream queue is full.
        """
        rule = policy.RULES[method].cache
        if method == "sendTransaction":
            return await self._send_pool.execute(method, params)
        if rule is CacheClass.NEVER:
            return await self._pool.execute(method, params)
        if rule is CacheClass.SIGNATURES:
            history = bool(params[1].get("searchTransactionHistory")) if len(params) > 1 else False
            return await self.statuses.statuses(params[0], history)
        ttl = self.policy.ttl(method, params)
        key = cache_key("rpc:" + method, params, policy.commitment(params))
        stats = self._methods[method if method in policy.RULES else "(other)"]
        ran = False

        async def fetch() -> Any:
            nonlocal ran
            ran = True
            try:
                return await self._pool.execute(method, params)
            except (UpstreamError, Overloaded) as exc:
                raise _Fresh(exc) from None

        hit = ttl > 0 and self._cache.peek(key) is not None
        try:
            cached = await self._cache.get_or_fetch(key, fetch, ttl=ttl)
        except _Fresh as wrapped:
            raise wrapped.error from None
        finally:
            if hit:
                stats.hits += 1
            elif ran:
                stats.misses += 1
            else:
                stats.coalesced += 1
        if ran and ttl > 0:
            self._remember(method, params, key)
            if rule is CacheClass.TRANSACTION and cached.value is not None and policy.commitment(params) != "confirmed":
                self._cache.put(key, cached.value, ttl=policy.IMMUTABLE_TTL)  # finalized: immutable
        return cached.value

    async def _read(self, method: str, params: list[Any]) -> Any:
        return await self._pool.execute(method, params)

    def _remember(self, method: str, params: list[Any], key: str) -> None:
        for account in policy.account_keys(method, params):
            keys = self._by_account.get(account)
            if keys is None:
                keys = self._by_account[account] = set()
            if len(keys) < 32:
                keys.add(key)

    def account_changed(self, pubkey: str) -> None:
        """A PubSub notification says ``pubkey`` changed: its cached reads are old now."""
        keys = self._by_account.pop(pubkey, None)
        for key in keys or ():
            self._cache.invalidate(key)
            self._n["invalidated"] += 1

    # ---- observability -------------------------------------------------------------

    def _count(self, method: str, outcome: str) -> None:
        if method not in self._methods and len(self._methods) >= _MAX_TRACKED_METHODS:
            method = "(other)"
        self._methods[method].outcomes[outcome] += 1

    def stats(self) -> dict[str, Any]:
        """Calls by method and outcome, cache hit rate per method, merge counts."""
        methods = {}
        for name, m in sorted(self._methods.items()):
            lookups = m.hits + m.misses + m.coalesced
            methods[name] = {
                "calls": dict(m.outcomes),
                "cache_hits": m.hits,
                "cache_misses": m.misses,
                "coalesced": m.coalesced,
                "cache_hit_rate": round(m.hits / lookups, 4) if lookups else 0.0,
            }
        return {
            "requests": self._n["requests"],
            "batches": self._n["batches"],
            "batch_too_large": self._n["batch_too_large"],
            "rate_limited": self._n["rate_limited"],
            "invalidated_by_notifications": self._n["invalidated"],
            "methods": methods,
            "signature_statuses": self.statuses.stats(),
            "send_pool": {k: v for k, v in self._send_pool.stats().items() if k in ("calls", "errors", "timeouts")},
        }


def _has_id(item: Any) -> bool:
    return isinstance(item, dict) and "id" in item


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _method_name(item: Any) -> str:
    method = item.get("method") if isinstance(item, dict) else None
    return method if isinstance(method, str) and method in policy.RULES else "(other)"
