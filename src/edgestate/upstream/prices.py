"""Jupiter Price API v3 client: cached, single-flight, ids batched, rate limited.

``get_price(mint)`` goes through the :class:`~edgestate.cache.Cache` (so concurrent
lookups of one mint share one fetch), then into a queue of mints. One sender task turns
the queue into ``GET {url}?ids=a,b,c`` requests of at most 50 ids: it waits
``batch_window`` after the first mint arrives, then for a token of the price API's own
:class:`~edgestate.upstream.ratelimit.RateLimiter`, and takes whatever is queued by
then (STATE mints first). Under the rate limit, mints that arrive while waiting for a
token ride along, so requests fill up instead of queueing up.

Bounds (issue 10): a lookup, queueing, attempts and retries together, ends within
``timeout`` (``upstream.request_timeout``) with :class:`UpstreamTimeout`; at most
``price.max_pending_mints`` distinct mints wait for a request (a user lookup of another
one gets :class:`Overloaded` with a ``retry_after`` of the queue's drain time); a mint
whose callers all left or gave up is dropped from the queue unfetched; a reply body is
read up to :data:`MAX_BODY_BYTES` and aborted beyond.
"""

from __future__ import annotations

import json
import math
import random
import statistics as _stats
from collections import deque
from collections.abc import Sequence
from typing import Any

import httpx
import trio
from solders.pubkey import Pubkey

from ..cache import Cache, Cached, cache_key
from ..config import PriceConfig, redact
from ..errors import EdgeStateError, Overloaded, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..telemetry import Telemetry, outcome_of
from .bodies import read_capped
from .ratelimit import Priority, RateLimiter

MAX_IDS = 50  # Jupiter Price API v3: at most 50 ids per call
# A 50-id reply is ~10-25 KB (an entry is a few hundred bytes); 1 MiB is no price reply.
MAX_BODY_BYTES = 1024 * 1024
_BACKOFF_BASE = 0.5  # seconds; full jitter over base * 2**attempt
_BACKOFF_CAP = 10.0
_MAX_RETRY_AFTER = 300.0  # never believe a Retry-After longer than this


class _Pending:
    """One mint waiting for a request; its callers wait on ``done``."""

    __slots__ = ("mint", "priority", "seq", "deadline", "waiters", "sent", "done", "price", "error")

    def __init__(self, mint: str, priority: Priority, seq: int, deadline: float) -> None:
        self.mint = mint
        self.priority = priority
        self.seq = seq
        self.deadline = deadline  # the latest of its callers' deadlines
        self.waiters = 0
        self.sent = False
        self.done = trio.Event()
        self.price: float | None = None
        self.error: EdgeStateError | None = None


def _parse_retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None  # an HTTP date: rare for APIs; the limiter's default pause applies
    return min(seconds, _MAX_RETRY_AFTER) if seconds >= 0 else None


def _parse_entry(mint: str, entry: Any) -> float | None:
    """The usdPrice of one response entry; None when Jupiter has no price."""
    if entry is None:
        return None
    price = entry.get("usdPrice") if isinstance(entry, dict) else None
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price):
        shown = repr(entry)[:80]
        raise UpstreamError(f"price API: bad entry for {mint}: expected {{usdPrice: number}}, got {shown}")
    return float(price)


class PriceClient:
    """Prices of SPL tokens in USD from a Jupiter Price API v3 compatible endpoint.

    Args:
        cfg: ``url``, ``api_key`` (sent as ``x-api-key`` when set),
            ``max_requests_per_second`` (the price API's own limit) and
            ``max_pending_mints`` (bound of the queue of distinct mints).
        cache: the shared cache; prices use method ``"price"`` for their TTL.
        batch_window: seconds to collect mints before a request goes out.
        transport: an httpx transport (tests pass ``httpx.MockTransport``).
        timeout: seconds a whole lookup may take, from the call to the answer: the
            wait in the queue and for the rate limiter, every attempt and retry
            (the server passes ``upstream.request_timeout``).
        max_retries: retries on 429, 5xx, connection errors and timeouts, while
            time is left.
    """

    def __init__(
        self,
        cfg: PriceConfig,
        cache: Cache,
        *,
        batch_window: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        max_retries: int = 2,
    ) -> None:
        self._cfg = cfg
        self._cache = cache
        self._batch_window = batch_window
        self._transport = transport
        self._timeout = timeout
        self._max_retries = max_retries
        self._where = redact(cfg.url)
        self.limiter = RateLimiter(cfg.max_requests_per_second, name="price")
        self._client: httpx.AsyncClient | None = None
        self._queue: dict[str, _Pending] = {}  # mints not yet sent, in arrival order
        self._wakeup = trio.Event()
        self._seq = 0
        self._requests = self._ids_requested = self._batches = 0
        self._errors = self._retries = 0
        self._rejected = self._dropped = self._timeouts = 0
        self._latencies: deque[float] = deque(maxlen=1000)
        # /metrics counters (services.py hands in the process's own); outages logged there.
        self.telemetry = Telemetry()

    def __repr__(self) -> str:
        return f"<PriceClient {self._where} queued={len(self._queue)} requests={self._requests}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the HTTP client and the sender task until cancelled."""
        # identity: a compressed body could expand past the cap within a single chunk.
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        if self._cfg.api_key:
            headers["x-api-key"] = self._cfg.api_key
        async with httpx.AsyncClient(transport=self._transport, timeout=self._timeout, headers=headers) as client:
            self._client = client
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender, nursery)
                    task_status.started()
            finally:
                self._client = None
                self._fail_all(UpstreamUnavailable("price client stopped"))

    # -- sync state changes ---------------------------------------------------------

    def _enqueue(self, mint: str, priority: Priority, deadline: float) -> _Pending:
        """The queue entry of ``mint`` (joined or new).

        Raises:
            Overloaded: ``mint`` is not queued and ``max_pending_mints`` are; the
                shared state's own lookups (``Priority.STATE``) are always let in.
        """
        pending = self._queue.get(mint)
        if pending is None:
            limit = self._cfg.max_pending_mints
            if priority is not Priority.STATE and len(self._queue) >= limit:
                self._rejected += 1
                raise Overloaded(
                    f"price lookups overloaded: {len(self._queue)} mints already wait for the price API"
                    f" (price.max_pending_mints = {limit})",
                    retry_after=self._drain_time(),
                )
            self._seq += 1
            pending = self._queue[mint] = _Pending(mint, priority, self._seq, deadline)
            self._wakeup.set()
        pending.priority = min(pending.priority, priority)
        pending.deadline = max(pending.deadline, deadline)
        return pending

    def _drain_time(self) -> float:
        """Seconds until the queue as it is now has been sent (1 to 60)."""
        per_second = MAX_IDS * max(self._cfg.max_requests_per_second, 1e-6)
        return min(60.0, max(1.0, len(self._queue) / per_second))

    def _take_batch(self) -> list[_Pending]:
        batch = sorted(self._queue.values(), key=lambda p: (p.priority, p.seq))[:MAX_IDS]
        for pending in batch:
            pending.sent = True
            del self._queue[pending.mint]
        return batch

    def _fail_all(self, error: EdgeStateError) -> None:
        for pending in self._queue.values():
            pending.error = error
            pending.done.set()
        self._queue.clear()

    def _record(self, latency: float) -> None:
        self._requests += 1
        self._latencies.append(latency)

    # -- tasks ----------------------------------------------------------------------

    async def _sender(self, nursery: trio.Nursery) -> None:
        leftover = False  # mints left over from a full batch go out without a new window
        while True:
            while not self._queue:
                leftover = False
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            if not leftover:
                await trio.sleep(self._batch_window)  # let the rest of the batch arrive
                if not self._queue:
                    continue  # every caller left while we waited
            await self.limiter.acquire(priority=min(p.priority for p in self._queue.values()))
            batch = self._take_batch()
            leftover = bool(self._queue)
            if batch:
                self._batches += 1
                self._ids_requested += len(batch)
                nursery.start_soon(self._send, batch)

    async def _send(self, batch: list[_Pending]) -> None:
        """Request ``batch`` (its first token already taken) and settle every mint."""
        # Tried until its last caller gives up, and no longer.
        deadline = max(p.deadline for p in batch)
        try:
            body = await self._request_with_retries([p.mint for p in batch], batch[0].priority, deadline)
        except EdgeStateError as exc:
            for pending in batch:
                pending.error = exc
                pending.done.set()
            return
        for pending in batch:
            try:
                pending.price = _parse_entry(pending.mint, body.get(pending.mint))
            except UpstreamError as exc:
                self._errors += 1
                pending.error = exc
            pending.done.set()

    async def _request_with_retries(self, mints: list[str], priority: Priority, deadline: float) -> dict[str, Any]:
        """Attempts until one succeeds, one fails for good, or ``deadline`` leaves no time."""
        attempt = 0
        while True:
            rate_limited = False
            try:
                status, retry_after, body = await self._request(mints, deadline)
                if status == 429:
                    rate_limited = True
                    self.limiter.penalize(_parse_retry_after(retry_after))
                    raise UpstreamError(f"price API {self._where}: HTTP 429 (rate limited)")
                return self._parse_body(status, body)
            except UpstreamError as exc:
                self._errors += 1
                if not exc.retryable or attempt >= self._max_retries:
                    raise
                last = exc
            attempt += 1
            # After a 429 the limiter's pause is the back-off.
            delay = 0.0 if rate_limited else random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
            if trio.current_time() + delay >= deadline:
                raise last  # no time left for another attempt
            self._retries += 1
            await trio.sleep(delay)
            with trio.move_on_at(deadline):
                await self.limiter.acquire(priority=priority)
                continue
            raise last

    async def _request(self, mints: list[str], deadline: float) -> tuple[int, str | None, bytes]:
        """One HTTP attempt: (status, Retry-After header, body of a 200).

        The body is streamed and read up to MAX_BODY_BYTES; transport failures, an
        over-long body and running out of time become UpstreamError subclasses.
        """
        client = self._client
        if client is None:
            raise UpstreamUnavailable("price client is not running")
        t0 = trio.current_time()
        timeout = min(self._timeout, deadline - t0)
        if timeout <= 0:
            raise UpstreamTimeout(f"price API {self._where}: no time left for a request")
        body: bytes | None
        try:
            with trio.fail_after(timeout):
                async with client.stream("GET", self._url_for(mints)) as response:
                    status = response.status_code
                    if status != 200:
                        return status, response.headers.get("retry-after"), b""  # body unread
                    body = await read_capped(response, MAX_BODY_BYTES)
        except (trio.TooSlowError, httpx.TimeoutException):
            raise UpstreamTimeout(f"price API {self._where}: no reply in {timeout:.3g}s") from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise UpstreamUnavailable(f"price API {self._where}: {self._scrub(exc)}") from None
        finally:
            self._record(trio.current_time() - t0)
        if body is None:
            raise self._malformed(f"body over {MAX_BODY_BYTES} bytes, aborted")
        return status, None, body

    def _parse_body(self, status: int, raw: bytes) -> dict[str, Any]:
        if status != 200:
            error = UpstreamError(f"price API {self._where}: HTTP {status}")
            error.retryable = status >= 500
            raise error
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nesting ~1000 deep
            raise self._malformed(f"not JSON: {raw[:60].decode('utf-8', 'replace')!r}") from None
        if not isinstance(body, dict):
            raise self._malformed(f"expected an object keyed by mint, got {type(body).__name__}")
        return body

    def _url_for(self, mints: list[str]) -> str:
        # Built by hand: httpx ``params=`` would drop a query already in cfg.url and
        # encode the commas. Mints are validated base58, so nothing needs escaping.
        return f"{self._cfg.url}{'&' if '?' in self._cfg.url else '?'}ids={','.join(mints)}"

    def _malformed(self, what: str) -> UpstreamError:
        error = UpstreamError(f"price API {self._where}: malformed reply, {what}")
        error.retryable = False  # the same request will get the same answer
        return error

    def _scrub(self, exc: Exception) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        text = text.replace(self._cfg.url, self._where)  # request URLs start with cfg.url
        if self._cfg.api_key:
            text = text.replace(self._cfg.api_key, "***")
        return text

    # -- public API -----------------------------------------------------------------

    async def _fetch(self, mint: str, priority: Priority, deadline: float) -> float | None:
        started = trio.current_time()
        outcome = "ok"
        try:
            return await self._fetch_one(mint, priority, deadline)
        except BaseException as exc:
            outcome = outcome_of(exc)
            self.telemetry.note_failure("price", outcome, exc)
            raise
        finally:
            self.telemetry.upstream_call("price", "price", outcome, trio.current_time() - started)

    async def _fetch_one(self, mint: str, priority: Priority, deadline: float) -> float | None:
        if self._client is None:
            raise UpstreamUnavailable("price client is not running")
        pending = self._enqueue(mint, priority, deadline)
        pending.waiters += 1
        try:
            with trio.move_on_at(deadline):
                await pending.done.wait()
        finally:
            pending.waiters -= 1
            if not pending.waiters and not pending.sent and self._queue.get(mint) is pending:
                del self._queue[mint]  # nobody wants it any more: don't spend a request slot
                self._dropped += 1
        if not pending.done.is_set():
            self._timeouts += 1
            where = "in flight" if pending.sent else "still queued"
            raise UpstreamTimeout(f"price API {self._where}: no price for {mint} within {self._timeout:g}s ({where})")
        if pending.error is not None:
            # A batch error is shared by its mints: start each raise with a clean traceback.
            raise pending.error.with_traceback(None)
        return pending.price

    def would_fetch(self, mint: str) -> bool:
        """Whether a lookup of ``mint`` now would cost the price API anything.

        False while its price is fresh in the cache or a lookup of it is already
        under way (a new one would share it): callers charge per-client shares by it.
        """
        return self._cache.would_fetch(cache_key("price", mint))

    async def get_price(
        self, mint: str, *, priority: Priority = Priority.USER, refresh: bool = False
    ) -> Cached[float | None]:
        """The USD price of ``mint``; ``value`` is None when the API has no price for it.

        Args:
            mint: base58 mint address.
            priority: ``Priority.STATE`` for the shared-state refresh (goes first).
            refresh: drop the cached value first (still single-flight).

        Raises:
            ValueError: ``mint`` is not a base58 public key (checked here so one bad
                id cannot make the API reject a whole batch).
            UpstreamError: the request failed (UpstreamTimeout when no answer came
                within ``timeout`` of the call) and no last-good price younger than
                ``cache.max_stale`` exists.
            Overloaded: ``price.max_pending_mints`` other mints are queued (and no
                last-good price exists); ``retry_after`` says when to come back.
        """
        Pubkey.from_string(mint)  # raises ValueError naming the problem
        deadline = trio.current_time() + self._timeout
        key = cache_key("price", mint)
        if refresh:
            self._cache.invalidate(key)
        queued = self._queue.get(mint)
        if queued is not None:  # a STATE lookup joining a USER one lifts its priority
            queued.priority = min(queued.priority, priority)
        return await self._cache.get_or_fetch(
            key, lambda: self._fetch(mint, priority, deadline), method="price", shared=priority is Priority.STATE
        )

    async def get_prices(
        self, mints: Sequence[str], *, priority: Priority = Priority.USER
    ) -> dict[str, Cached[float | None]]:
        """Prices of several mints (one request per 50 uncached ones).

        Raises:
            ValueError: a mint is not a base58 public key (nothing is requested).
            EdgeStateError: the first error of any mint, after all lookups finished.
        """
        for mint in mints:
            Pubkey.from_string(mint)
        results: dict[str, Cached[float | None]] = {}
        errors: list[EdgeStateError] = []

        async def one(mint: str) -> None:
            try:
                results[mint] = await self.get_price(mint, priority=priority)
            except EdgeStateError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for mint in dict.fromkeys(mints):
                nursery.start_soon(one, mint)
        if errors:
            raise errors[0]
        return {mint: results[mint] for mint in dict.fromkeys(mints)}

    def stats(self) -> dict[str, Any]:
        """A JSON-serializable snapshot (the API key never appears)."""
        lat = sorted(self._latencies)
        return {
            "url": self._where,
            "requests": self._requests,
            "batches": self._batches,
            "ids_requested": self._ids_requested,
            "avg_ids_per_request": self._ids_requested / self._batches if self._batches else 0.0,
            "queued": len(self._queue),
            "max_pending": self._cfg.max_pending_mints,
            "rejected": self._rejected,
            "dropped": self._dropped,
            "timeouts": self._timeouts,
            "errors": self._errors,
            "retries": self._retries,
            "latency_last_s": self._latencies[-1] if lat else None,
            "latency_p50_s": _stats.median(lat) if lat else None,
            "latency_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "rate_limiter": self.limiter.stats(),
        }
