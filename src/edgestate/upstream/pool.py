"""Memory-channel upstream pool: batching, merging, retries and failover.

Callers ``await pool.execute(method, params)``. Each call goes through a bounded
per-priority memory channel to a batcher that collects one window of calls
(``batch_window_ms`` from the first one, or until ``max_batch_size`` wire items),
dedupes identical calls, merges single-account reads into ``getMultipleAccounts``,
packs them into batches of at most ``max_batch_size`` items and ``max_batch_bytes`` of
JSON, takes rate-limiter tokens (one per item, plus the per-method limits) and hands the
batch to one of ``max_connections`` workers sharing one ``httpx.AsyncClient``. Replies
are routed back by JSON-RPC id into a per-call one-shot slot, so a caller that gave up
never blocks a worker.

What providers answer besides results, and what the pool does about it:

* HTTP 413 (body too large): the batch is split in halves and each half is retried;
* one error object for a whole batch (a provider that refuses batches): every call is
  retried on its own, and the endpoint is remembered as batch-refusing (logged, in stats);
* 401/403 (key or IP blocked), 5xx, timeouts, connection errors and -32005 (node behind):
  the endpoint fails over to the next one, with the reason in ``stats()["endpoints"]``;
* 429: Retry-After honoured, the rate halved for a while (the rate limiter's job).

Credits (``method_costs``) are counted per endpoint in a :class:`CreditMeter` for every
request sent; they are a monthly budget, not part of the per-second rate limit.
"""

from __future__ import annotations

import collections
import email.utils
import json
import logging
import math
import random
import traceback
from typing import Any

import httpx
import trio

from ..config import UpstreamConfig, redact
from ..errors import Overloaded, RpcError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..telemetry import Telemetry, outcome_of
from .batching import GMA_MAX, Call, ErrSpec, Window, Wire, pack
from .bodies import read_capped
from .costs import CreditMeter
from .ratelimit import Priority, RateLimiter

log = logging.getLogger("edgestate.upstream")

_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 5.0
_DOWN_AFTER = 3  # consecutive transport/5xx failures before an endpoint is marked down
_PROBE_EVERY = 2.0
_PROBE_CAP = 30.0
_ITEM_RETRY = frozenset({429})  # per-item error codes worth another attempt
_PROBE_BODY_CAP = 65536  # a getHealth reply is a few dozen bytes
NODE_BEHIND = -32005  # agave: JSON_RPC_SERVER_ERROR_NODE_UNHEALTHY ("Node is behind by N slots")
_BLOCKED = frozenset({401, 403})  # the key or the address is refused: this endpoint is no use now


class _RedactUrls(logging.Filter):
    """httpx logs every request URL at INFO, and ours may hold an API key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact(str(a)) if isinstance(a, httpx.URL) or (isinstance(a, str) and "://" in a) else a
                for a in record.args
            )
        return True


def _redact_httpx_logs() -> None:
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactUrls())


class _Batch:
    __slots__ = ("wires", "priority")

    def __init__(self, wires: list[Wire], priority: Priority) -> None:
        self.wires, self.priority = wires, priority


class _Endpoint:
    __slots__ = (
        "url", "label", "healthy", "failures", "last_error", "failed_at", "probe_at", "probe_delay",
        "down_reason", "refuses_batches",
    )

    def __init__(self, url: str) -> None:
        self.url, self.label = url, redact(url)
        self.healthy = True
        self.failures = 0
        self.last_error: str | None = None
        self.down_reason: str | None = None  # why it was marked down, for /stats
        self.refuses_batches = False  # answered a batch with one error object: send calls singly
        self.failed_at = -math.inf
        self.probe_at = 0.0
        self.probe_delay = _PROBE_EVERY


class _Outcome:
    """What one POST left to do."""

    __slots__ = ("retry", "error", "floor", "failed", "split", "refused")

    def __init__(
        self, retry: list[Wire], error: ErrSpec, floor: float = 0.0, failed: bool = False,
        *, split: bool = False, refused: bool = False,
    ) -> None:
        self.retry, self.error, self.floor, self.failed = retry, error, floor, failed
        self.split = split  # HTTP 413: send the wires again in two halves
        self.refused = refused  # a batch refused as a whole: send the wires one by one


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = email.utils.parsedate_to_datetime(resp.headers["date"]) if "date" in resp.headers else None
    delta = (when - date).total_seconds() if date is not None else 1.0
    return min(max(delta, 0.0), 60.0)


def _rpc_error(obj: Any) -> RpcError | None:
    if not isinstance(obj, dict):
        return None
    code, message = obj.get("code"), obj.get("message", "")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
        return None
    return RpcError(code, message, obj.get("data"))


class _Body(httpx.AsyncByteStream):
    """A request body httpx can send without an async generator.

    httpx's own byte stream is an async generator; when a request is cancelled mid-send
    (a deadline, or shutdown) it is left unfinished and Trio warns when it is collected.
    """

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


def _json_request(url: str, body: bytes) -> httpx.Request:
    # With an explicit stream httpx adds no headers of its own: give Host and length.
    headers = {
        "host": httpx.URL(url).netloc.decode("ascii"),
        "content-type": "application/json",
        "content-length": str(len(body)),
    }
    return httpx.Request("POST", url, headers=headers, stream=_Body(body))


class Pool:
    """The only path to the Solana RPC provider.

    Args:
        cfg: upstream settings (URLs, connections, batching, retries, timeouts).
        limiter: shared rate limiter; every attempt pays for each item it sends.
        transport: optional httpx transport (tests pass ``httpx.MockTransport``).
    """

    def __init__(
        self, cfg: UpstreamConfig, limiter: RateLimiter, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        _redact_httpx_logs()
        self._cfg = cfg
        self._limiter = limiter
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._queues = {p: trio.open_memory_channel[Call](cfg.max_queue) for p in Priority}
        self._ready: dict[Priority, collections.deque[_Batch]] = {p: collections.deque() for p in Priority}
        self._work_lot = trio.lowlevel.ParkingLot()  # idle workers
        self._room_lot = trio.lowlevel.ParkingLot()  # batchers waiting for a free slot
        self._endpoints = [_Endpoint(u) for u in cfg.rpc_urls]
        # Per-method per-second limits on top of the pool-wide one (Helius: getProgramAccounts).
        self._method_limiters = {
            m: RateLimiter(rate, name=f"upstream {m}") for m, rate in cfg.method_rate_limits.items()
        }
        self.credits = CreditMeter()
        # A batch's items count as requests in the second it is sent: never more per batch
        # than one second of the limits allows (Helius Free: 10 items, 5 getProgramAccounts).
        self._items_cap = min(cfg.max_batch_size, max(1, int(cfg.max_requests_per_second)))
        self._method_caps = {m: max(1, int(rate)) for m, rate in cfg.method_rate_limits.items()}
        self._failovers: collections.Counter[str] = collections.Counter()
        self._window_s = cfg.batch_window_ms / 1000
        # One attempt may use at most half the deadline, so a hung endpoint leaves time to fail over.
        self._attempt_timeout = cfg.request_timeout / 2 if len(self._endpoints) > 1 else cfg.request_timeout
        self._next_id = 0
        self._active = 0
        self._pending: set[Call] = set()  # every caller still waiting, to fail them on shutdown
        self._latency: collections.deque[float] = collections.deque(maxlen=1000)
        self._by_method: collections.Counter[str] = collections.Counter()
        self._n = collections.Counter[str]()
        # /metrics counters (services.py hands in the process's own); outages logged there.
        self.telemetry = Telemetry()

    # ---- callers -------------------------------------------------------------------

    async def execute(self, method: str, params: list[Any] | None = None, *, priority: Priority = Priority.USER) -> Any:
        """Send one JSON-RPC call (batched with others) and return its ``result``.

        Counted in :attr:`telemetry` (outcome and duration); see :meth:`_execute` for the errors.
        """
        started = trio.current_time()
        outcome = "ok"
        try:
            return await self._execute(method, params, priority=priority)
        except BaseException as exc:
            outcome = outcome_of(exc)
            self.telemetry.note_failure("rpc", outcome, exc)
            raise
        finally:
            self.telemetry.upstream_call("rpc", method, outcome, trio.current_time() - started)

    async def _execute(self, method: str, params: list[Any] | None = None, *, priority: Priority = Priority.USER) -> Any:
        """Send one JSON-RPC call (batched with others) and return its ``result``.

        Raises:
            Overloaded: the queue is full (``retry_after`` hints when to come back).
            UpstreamTimeout: no result within ``request_timeout`` (queue wait included).
            RpcError: the provider answered this call with a JSON-RPC error object.
            UpstreamError: bad status, malformed reply, or retries exhausted.
        """
        call = Call(method, params, priority, trio.current_time() + self._cfg.request_timeout)
        send = self._queues[priority][0]
        try:
            send.send_nowait(call)
        except trio.WouldBlock:
            self._n["overloaded"] += 1
            hint = min(max(1.0, self._cfg.max_queue / self._cfg.max_requests_per_second), 30.0)
            raise Overloaded(f"upstream queue full ({self._cfg.max_queue} calls waiting)", retry_after=hint) from None
        except trio.ClosedResourceError:
            raise UpstreamUnavailable("upstream pool is not running") from None
        self._n["calls"] += 1
        if len(self._by_method) < 200 or method in self._by_method:  # bounded: methods may come from clients
            self._by_method[method] += 1
        self._pending.add(call)
        try:
            with trio.move_on_at(call.deadline):
                await call.done.wait()
        finally:
            call.gone = True  # also on cancellation: the worker just drops the result
            self._pending.discard(call)
        if not call.done.is_set():
            self._n["timeouts"] += 1
            raise UpstreamTimeout(f"{method}: no upstream reply within {self._cfg.request_timeout:g}s")
        if call.error is not None:
            self._n["timeouts" if isinstance(call.error, UpstreamTimeout) else "errors"] += 1
            raise call.error
        return call.result

    # ---- tasks ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the HTTP client, batchers, workers and health prober until cancelled."""
        limits = httpx.Limits(max_connections=self._cfg.max_connections)
        timeout = httpx.Timeout(self._cfg.request_timeout)
        try:
            async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=self._transport) as client:
                self._client = client
                async with trio.open_nursery() as nursery:
                    for prio, (_, rx) in self._queues.items():
                        nursery.start_soon(self._batcher, prio, rx)
                    for _ in range(self._cfg.max_connections):
                        nursery.start_soon(self._worker)
                    nursery.start_soon(self._prober)
                    task_status.started()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Refuse new calls and fail every waiting one (sync: safe in a cancelled finally)."""
        for send, _ in self._queues.values():
            send.close()
        for queue in self._ready.values():
            queue.clear()
        # Queued, in a window, or in flight: nobody will answer them now.
        for call in list(self._pending):
            call.resolve(error=UpstreamUnavailable(f"{call.method}: upstream pool stopped"))

    async def _batcher(self, priority: Priority, rx: trio.MemoryReceiveChannel[Call]) -> None:
        # One batcher per priority: state refreshes never queue behind user lookups.
        max_calls = self._cfg.max_batch_size * GMA_MAX
        # With max_batch_size 1 the window stays open so reads can still merge.
        close_at = self._cfg.max_batch_size if self._cfg.max_batch_size > 1 else math.inf
        async for first in rx:
            if not first.waiting:
                continue
            window = Window()
            window.add(first)
            with trio.move_on_at(trio.current_time() + self._window_s):
                while window.wires < close_at and window.calls < max_calls:
                    call = await rx.receive()
                    if call.waiting:
                        window.add(call)
            wires, merged = window.build()
            self._n["merged"] += merged
            for chunk in pack(wires, max_items=self._items_cap, max_bytes=self._cfg.max_batch_bytes,
                              per_method=self._method_caps):
                batch = _Batch(chunk, priority)
                try:
                    await self._submit(batch)
                except Exception as exc:  # a bug must cost one batch, never the pool
                    self._crashed(batch, exc)

    async def _submit(self, batch: _Batch) -> None:
        while sum(map(len, self._ready.values())) >= self._cfg.max_connections:
            await self._room_lot.park()
        if not await self._pay(batch.wires, batch.priority):
            return
        self._ready[batch.priority].append(batch)
        self._n["batches"] += 1
        self._n["batched_items"] += len(batch.wires)
        self._work_lot.unpark()

    async def _pay(self, wires: list[Wire], priority: Priority) -> bool:
        """Take rate-limit tokens for the live ``wires``; False when nobody waits any more.

        One token per call (providers count each batch item as a request), from the
        per-method limiters first, then from the pool-wide one. Credits are not tokens:
        they are counted when the request is sent (:class:`CreditMeter`).
        """
        wires[:] = [w for w in wires if w.alive()]
        if not wires:
            return False
        by_method = collections.Counter(w.method for w in wires)
        # Never spend tokens on calls whose callers all gave up while we queued.
        with trio.move_on_at(max(c.deadline for w in wires for c, _, _ in w.waiters)):
            for method, n in by_method.items():
                limiter = self._method_limiters.get(method)
                if limiter is not None:
                    await limiter.acquire(float(n), priority=priority)
            await self._limiter.acquire(float(len(wires)), priority=priority)
            return True
        for wire in wires:
            wire.fail((UpstreamTimeout, f"{wire.method}: rate limit wait outlasted the deadline"))
        return False

    def _take_ready(self) -> _Batch | None:
        for prio in sorted(self._ready):
            if self._ready[prio]:
                self._room_lot.unpark_all()
                return self._ready[prio].popleft()
        return None

    async def _worker(self) -> None:
        while True:
            batch = self._take_ready()
            if batch is None:
                await self._work_lot.park()
                continue
            self._active += 1
            try:
                await self._process(batch)
            except Exception as exc:  # a bug must cost one batch, never the pool
                self._crashed(batch, exc)
            finally:
                self._active -= 1

    def _crashed(self, batch: _Batch, exc: Exception) -> None:
        # Type and place only: an exception's text may hold a URL with a key.
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {where.filename}:{where.lineno}" if where else ""
        log.error("upstream batch failed: %s%s", type(exc).__name__, at)
        for wire in batch.wires:
            wire.fail((UpstreamError, f"internal error handling {wire.method}: {type(exc).__name__}"))

    # ---- one batch: attempts, retries, failover ------------------------------------

    async def _process(self, batch: _Batch) -> None:
        pending, floor, exclude = batch.wires, 0.0, None
        error: ErrSpec = (UpstreamError, "no attempt made")
        for attempt in range(self._cfg.max_retries + 1):
            if attempt:
                delay = max(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)), floor)
                deadline = max(c.deadline for w in pending for c, _, _ in w.waiters)
                if trio.current_time() + delay >= deadline:
                    break  # nobody would still be waiting for the answer
                self._n["retries"] += 1
                log.debug("retrying %d call(s) in %.2fs after %s", len(pending), delay, error[1])
                await trio.sleep(delay)
                if not await self._pay(pending, batch.priority):
                    return
            pending = [w for w in pending if w.alive()]
            if not pending:
                return
            endpoint = self._pick_endpoint(exclude)
            if len(pending) > 1 and endpoint.refuses_batches:
                await self._one_by_one(pending, batch.priority, paid=True)
                return
            out = await self._attempt(endpoint, pending)
            if out.split:
                await self._split(pending, batch.priority)
                return
            if out.refused:
                await self._one_by_one(pending, batch.priority, paid=False)
                return
            error, floor = out.error, out.floor
            exclude = endpoint if out.failed else None
            if not out.retry:
                return
            pending = out.retry
        for wire in pending:
            wire.fail(error)

    async def _split(self, wires: list[Wire], priority: Priority) -> None:
        """HTTP 413: the halves go out as two batches (each paid again: they are new requests)."""
        self._n["split_413"] += 1
        half = len(wires) // 2
        for part in (wires[:half], wires[half:]):
            if await self._pay(part, priority):
                await self._process(_Batch(part, priority))

    async def _one_by_one(self, wires: list[Wire], priority: Priority, *, paid: bool) -> None:
        """Each wire as its own request, concurrently (``paid``: tokens already taken)."""
        self._n["sent_singly"] += len(wires)

        async def one(wire: Wire) -> None:
            if paid or await self._pay([wire], priority):
                await self._process(_Batch([wire], priority))

        async with trio.open_nursery() as nursery:
            for wire in wires:
                nursery.start_soon(one, wire)

    async def _attempt(self, ep: _Endpoint, wires: list[Wire]) -> _Outcome:
        """POST once and settle what can be settled; the outcome says what is left to do."""
        assert self._client is not None
        ids: dict[int, Wire] = {}
        items = []
        for wire in wires:
            self._next_id += 1
            ids[self._next_id] = wire
            items.append({"jsonrpc": "2.0", "id": self._next_id, "method": wire.method, "params": wire.params or []})
        is_batch = len(items) > 1
        body = json.dumps(items if is_batch else items[0], separators=(",", ":")).encode()
        deadline = max(c.deadline for w in wires for c, _, _ in w.waiters)
        timeout = min(deadline - trio.current_time(), self._attempt_timeout)
        self._n["http_requests"] += 1
        self._n["body_bytes"] += len(body)
        self._n["largest_body"] = max(self._n["largest_body"], len(body))
        self.credits.add(ep.label, float(sum(self._cfg.method_costs.get(w.method, 1) for w in wires)))
        t0 = trio.current_time()
        try:
            with trio.fail_after(max(timeout, 0.0)):
                # Streamed and read with a cap (upstream.max_response_bytes): an endless
                # or huge reply must cost one error, not the process's memory.
                resp = await self._client.send(_json_request(ep.url, body), stream=True)
                try:
                    content = await read_capped(resp, self._cfg.max_response_bytes)
                finally:
                    await resp.aclose()
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            self._endpoint_failed(ep, "Timeout" if isinstance(exc, trio.TooSlowError) else type(exc).__name__)
            return _Outcome(wires, (UpstreamTimeout, f"no reply from {ep.label} within {timeout:.1f}s"), failed=True)
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:  # str(exc) may hold the URL
            self._endpoint_failed(ep, type(exc).__name__)
            return _Outcome(wires, (UpstreamUnavailable, f"{type(exc).__name__} talking to {ep.label}"), failed=True)
        self._latency.append(trio.current_time() - t0)
        status = resp.status_code
        if status >= 500:
            self._endpoint_failed(ep, f"HTTP {status}")
            return _Outcome(wires, (UpstreamError, f"HTTP {status} from {ep.label}"), failed=True)
        if status in _BLOCKED:
            # A blocked key or address does not heal by retrying here: fail over at once.
            self._endpoint_failed(ep, f"HTTP {status} (key or address refused)", now=True)
            return _Outcome(wires, (UpstreamUnavailable, f"HTTP {status} from {ep.label} (key or address refused)"),
                            failed=True)
        if status == 413:
            if len(wires) > 1:
                log.info("%s refused a %d-byte batch of %d calls (HTTP 413): splitting it", ep.label, len(body),
                         len(wires))
                return _Outcome([], (UpstreamError, ""), split=True)
            return self._fail_all(wires, f"request body of {len(body)} bytes too large for {ep.label} (HTTP 413)")
        if content is None:
            cap = self._cfg.max_response_bytes
            return self._fail_all(wires, f"reply from {ep.label} over upstream.max_response_bytes ({cap} bytes): aborted")
        try:
            reply = json.loads(content) if status != 429 else None
        except ValueError:
            reply = ValueError
        # An error object as the whole body: the batch's (or the single call's) answer.
        whole = _rpc_error(reply.get("error")) if isinstance(reply, dict) else None
        if status == 429 or (whole is not None and whole.code == 429):
            self._endpoint_ok(ep)
            wait = _retry_after(resp)
            self._limiter.penalize(wait)
            log.info("rate limited by %s (retry after %s)", ep.label, wait)
            return _Outcome(wires, (UpstreamError, f"rate limited by {ep.label} (HTTP 429)"), wait or 0.0)
        if whole is not None and whole.code == NODE_BEHIND:
            self._endpoint_failed(ep, f"node behind ({NODE_BEHIND}: {whole.rpc_message[:80]})", now=True)
            return _Outcome(wires, (UpstreamError, f"{ep.label}: {whole.rpc_message[:80]} ({NODE_BEHIND})"),
                            failed=True)
        if is_batch and whole is not None and status in (200, 400):
            self._endpoint_ok(ep)
            self._batch_refused(ep, whole)
            return _Outcome([], (UpstreamError, ""), refused=True)
        self._endpoint_ok(ep)
        if status == 408:
            return _Outcome(wires, (UpstreamTimeout, f"HTTP 408 from {ep.label}"))
        if status != 200:
            return self._fail_all(wires, f"HTTP {status} from {ep.label}")
        if reply is ValueError:
            return self._fail_all(wires, f"malformed reply from {ep.label}: not JSON")
        if whole is not None:
            for wire in wires:
                wire.fail(whole)
            return _Outcome([], (UpstreamError, ""))
        if not is_batch:
            if isinstance(reply, dict) and reply.get("id") is None:
                reply = {**reply, "id": next(iter(ids))}  # a single call's reply is its own
            reply = [reply]
        if not isinstance(reply, list):
            return self._fail_all(wires, f"malformed batch reply from {ep.label}: {type(reply).__name__}, not a list")
        by_id = {it.get("id"): it for it in reply if isinstance(it, dict)}
        retry, behind = [], []
        for rid, wire in ids.items():
            item = by_id.get(rid)
            if item is None:
                wire.fail((UpstreamError, f"{wire.method}: no reply item with id {rid} from {ep.label}"))
            elif "error" in item:
                err = _rpc_error(item["error"])
                if err is None:
                    wire.fail((UpstreamError, f"{wire.method}: malformed error object from {ep.label}"))
                elif err.code in _ITEM_RETRY:
                    retry.append(wire)
                elif err.code == NODE_BEHIND:
                    behind.append((wire, err))
                else:
                    wire.fail(err)
            elif "result" in item:
                wire.deliver(item["result"])
            else:
                wire.fail((UpstreamError, f"{wire.method}: reply item has neither result nor error"))
        if behind:
            message = behind[0][1].rpc_message[:80]
            self._endpoint_failed(ep, f"node behind ({NODE_BEHIND}: {message})", now=True)
            return _Outcome(retry + [w for w, _ in behind], (UpstreamError, f"{ep.label}: {message} ({NODE_BEHIND})"),
                            failed=True)
        if retry:
            self._limiter.penalize(None)
        return _Outcome(retry, (UpstreamError, f"rate limited by {ep.label} (item error 429)"))

    def _batch_refused(self, ep: _Endpoint, error: RpcError) -> None:
        self._n["batch_refusals"] += 1
        if not ep.refuses_batches:
            ep.refuses_batches = True
            log.warning("%s answered a batch with one error (%d: %s): sending its calls one by one from now on",
                        ep.label, error.code, error.rpc_message[:80])

    def _fail_all(self, wires: list[Wire], message: str) -> _Outcome:
        log.warning("%s", message)
        for wire in wires:
            wire.fail((UpstreamError, f"{wire.method}: {message}"))
        return _Outcome([], (UpstreamError, message))

    # ---- endpoints -----------------------------------------------------------------

    def _pick_endpoint(self, exclude: _Endpoint | None) -> _Endpoint:
        healthy = [e for e in self._endpoints if e.healthy]
        options = [e for e in healthy if e is not exclude] or healthy
        if options:
            return options[0]
        # All down: still try, the one that failed longest ago first.
        others = [e for e in self._endpoints if e is not exclude] or self._endpoints
        return min(others, key=lambda e: e.failed_at)

    def _endpoint_failed(self, ep: _Endpoint, why: str, *, now: bool = False) -> None:
        """Count a failure; down after a few (``now``: at once, e.g. a refused key)."""
        ep.failures += 1
        ep.last_error = why
        ep.failed_at = trio.current_time()
        if len(self._endpoints) > 1:
            self._failovers[why.split(" (")[0]] += 1  # "HTTP 403", "node behind", "Timeout", ...
        if ep.healthy and (now or ep.failures >= _DOWN_AFTER):
            ep.healthy = False
            ep.down_reason = why
            ep.probe_delay = _PROBE_EVERY
            ep.probe_at = ep.failed_at + ep.probe_delay
            log.warning("upstream %s marked down after %d failure(s) (%s)", ep.label, ep.failures, why)

    def _endpoint_ok(self, ep: _Endpoint) -> None:
        ep.failures = 0
        if not ep.healthy:
            ep.healthy = True
            ep.down_reason = None
            log.warning("upstream %s is back up", ep.label)

    async def _prober(self) -> None:
        while True:
            await trio.sleep(_PROBE_EVERY / 2)
            for ep in self._endpoints:
                if not ep.healthy and trio.current_time() >= ep.probe_at:
                    await self._probe(ep)

    async def _probe(self, ep: _Endpoint) -> None:
        assert self._client is not None
        await self._limiter.acquire(1.0, priority=Priority.STATE)
        self.credits.add(ep.label, float(self._cfg.method_costs.get("getHealth", 1)))
        body = {"jsonrpc": "2.0", "id": 0, "method": "getHealth"}
        try:
            with trio.fail_after(min(self._cfg.request_timeout, 10.0)):
                resp = await self._client.send(_json_request(ep.url, json.dumps(body).encode()), stream=True)
                try:
                    content = await read_capped(resp, _PROBE_BODY_CAP)
                finally:
                    await resp.aclose()
            ok = resp.status_code == 200 and content is not None and json.loads(content).get("result") == "ok"
        except (trio.TooSlowError, httpx.HTTPError, ValueError, AttributeError):
            ok = False
        if ok:
            self._endpoint_ok(ep)
        else:
            ep.probe_delay = min(ep.probe_delay * 2, _PROBE_CAP)
            ep.probe_at = trio.current_time() + ep.probe_delay

    # ---- observability -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot for /stats and /metrics (URLs redacted)."""
        lat = sorted(self._latency)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
        credits = self.credits.stats()
        n = self._n
        return {
            "connections": self._cfg.max_connections,
            "active": self._active,
            "idle": self._cfg.max_connections - self._active,
            "queued": sum(s.statistics().current_buffer_used for s, _ in self._queues.values()),
            "calls": n["calls"],
            "http_requests": n["http_requests"],
            "batches": n["batches"],
            "avg_batch_size": round(n["batched_items"] / n["batches"], 2) if n["batches"] else 0.0,
            "merged": n["merged"],
            "errors": n["errors"],
            "timeouts": n["timeouts"],
            "retries": n["retries"],
            "overloaded": n["overloaded"],
            "latency_ms": {"p50": pick(0.5), "p99": pick(0.99)},
            "calls_by_method": dict(self._by_method),
            "endpoints": [
                {
                    "url": e.label, "healthy": e.healthy, "failures": e.failures, "last_error": e.last_error,
                    "down_reason": e.down_reason, "refuses_batches": e.refuses_batches,
                    "credits_total": round(self.credits.total(e.label), 3),
                    "projected_monthly_credits": round(self.credits.projected_per_month(e.label)),
                }
                for e in self._endpoints
            ],
            "failovers": dict(self._failovers),
            "batch_refusals": n["batch_refusals"],
            "batch_refusing_endpoints": [e.label for e in self._endpoints if e.refuses_batches],
            "sent_singly": n["sent_singly"],
            "split_413": n["split_413"],
            "largest_body_bytes": n["largest_body"],
            "max_batch_bytes": self._cfg.max_batch_bytes,
            "requests_per_second": round(self._limiter.observed_rate(), 3),
            "method_rate_limiters": {m: lim.stats() for m, lim in self._method_limiters.items()},
            "credits": credits,
            "credits_per_second": round(credits["projected_per_month"] / (30 * 86400), 6),
            "projected_monthly_credits": credits["projected_per_month"],
        }

    def __repr__(self) -> str:
        up = sum(e.healthy for e in self._endpoints)
        return f"<Pool {self._active}/{self._cfg.max_connections} active, {up}/{len(self._endpoints)} endpoints up>"
