"""TTL/LRU cache with single-flight misses and stale-if-error.

Two bounded stores, both on Trio's clock:

* ``fresh``: a :class:`cachetools.TLRUCache` with a TTL per entry. What it holds is
  served as is.
* ``last good``: a :class:`cachetools.LRUCache` of the newest value fetched per key.
  When a refresh fails with an upstream error (:class:`~edgestate.errors.UpstreamError`
  or :class:`~edgestate.errors.Overloaded`), a value younger than ``max_stale`` is
  served with ``stale=True`` instead of the error.

Concurrent misses for one key share one ``fetch()`` (single-flight). If the task that
runs it is cancelled, one of the waiters runs its own ``fetch()`` instead.

Two partitions, each with both stores (issue 10): the shared state's keys
(``shared=True``, e.g. the token price the refresher reads; bound
``cache.state_maxsize``) and user lookups (prices of any mint, balances per wallet;
bound ``cache.maxsize``). A flood of lookups evicts only other lookups, so the state's
last-good values are still there to serve during an outage. A key the state has used
stays in its partition when a user lookup refreshes it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import cachetools
import trio

from .config import CacheConfig
from .errors import Overloaded, UpstreamError

T = TypeVar("T")

# Errors a last-good value may stand in for. Anything else (bugs, bad input) propagates.
_STALE_OK = (UpstreamError, Overloaded)


@dataclass(frozen=True, slots=True)
class Cached(Generic[T]):
    """A value from the cache.

    Attributes:
        value: what ``fetch()`` returned (may be ``None``: negative entries are cached too).
        age: seconds since it was fetched.
        stale: True when served because a refresh failed.
    """

    value: T
    age: float
    stale: bool


@dataclass(frozen=True, slots=True)
class _Entry:
    value: Any
    fetched_at: float
    ttl: float


class _CountingTLRU(cachetools.TLRUCache):  # type: ignore[type-arg]
    """Counts evictions for room (expired entries are removed in ``expire`` instead)."""

    evictions = 0

    def popitem(self) -> tuple[Any, Any]:
        item = super().popitem()
        self.evictions += 1
        return item


class _Partition:
    """The fresh and last-good stores of one partition."""

    __slots__ = ("fresh", "last_good")

    def __init__(self, maxsize: int) -> None:
        self.fresh = _CountingTLRU(maxsize, ttu=_ttu, timer=trio.current_time)
        self.last_good: cachetools.LRUCache[Hashable, _Entry] = cachetools.LRUCache(maxsize)

    def holds(self, key: Hashable) -> bool:
        return key in self.last_good or key in self.fresh

    def drop(self, key: Hashable) -> None:
        self.fresh.pop(key, None)
        self.last_good.pop(key, None)

    def stats(self, maxsize: int) -> dict[str, int]:
        return {
            "size": len(self.fresh),
            "maxsize": maxsize,
            "last_good": len(self.last_good),
            "evictions": self.fresh.evictions,
        }


class _Flight:
    """One running ``fetch()`` that other callers for the same key wait on."""

    __slots__ = ("done", "result", "error", "tb")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Cached[Any] | None = None  # None with no error: the fetcher was cancelled
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None


def cache_key(method: str, params: Any, commitment: str | None = None) -> str:
    """A canonical string key for an upstream call (same call, same key).

    ``params`` must be JSON-serializable (other objects, e.g. Pubkeys, use ``str()``).
    """
    return json.dumps([method, params, commitment], sort_keys=True, separators=(",", ":"), default=str)


def _ttu(_key: Hashable, entry: _Entry, now: float) -> float:
    return now + entry.ttl


class Cache:
    """The shared cache of upstream answers.

    Args:
        cfg: ``ttl`` (default TTL), ``method_ttls`` (per-method TTLs), ``maxsize``
            (bound of each store of the user-lookup partition), ``state_maxsize``
            (the same for the shared state's partition) and ``max_stale`` (oldest
            value served on error).
    """

    def __init__(self, cfg: CacheConfig) -> None:
        self._cfg = cfg
        self._state = _Partition(cfg.state_maxsize)
        self._user = _Partition(cfg.maxsize)
        self._flights: dict[Hashable, _Flight] = {}
        self._hits = 0
        self._misses = 0
        self._coalesced = 0
        self._stale_served = 0
        self._errors = 0

    def __repr__(self) -> str:
        return (
            f"<Cache state={len(self._state.fresh)}/{self._cfg.state_maxsize}"
            f" user={len(self._user.fresh)}/{self._cfg.maxsize} inflight={len(self._flights)}>"
        )

    # -- sync state changes ---------------------------------------------------------

    def _ttl_for(self, ttl: float | None, method: str | None) -> float:
        if ttl is not None:
            return ttl
        if method is not None and method in self._cfg.method_ttls:
            return self._cfg.method_ttls[method]
        return self._cfg.ttl

    def _lookup(self, key: Hashable) -> Cached[Any] | None:
        entry: _Entry | None = self._state.fresh.get(key)
        if entry is None:
            entry = self._user.fresh.get(key)
            if entry is None:
                return None
        return Cached(entry.value, trio.current_time() - entry.fetched_at, False)

    def _partition(self, key: Hashable, shared: bool) -> _Partition:
        """Where ``key`` is stored: once the state used a key, it stays in its partition."""
        if shared:
            self._user.drop(key)
            return self._state
        return self._state if self._state.holds(key) else self._user

    def _store(self, key: Hashable, value: Any, ttl: float, shared: bool) -> Cached[Any]:
        part = self._partition(key, shared)
        entry = _Entry(value, trio.current_time(), ttl)
        if ttl > 0:
            part.fresh[key] = entry
        part.last_good[key] = entry
        return Cached(value, 0.0, False)

    def _fallback(self, key: Hashable) -> Cached[Any] | None:
        """The last good value for ``key`` if it is young enough to stand in."""
        entry = self._state.last_good.get(key)
        if entry is None:
            entry = self._user.last_good.get(key)
        if entry is None:
            return None
        age = trio.current_time() - entry.fetched_at
        if age > self._cfg.max_stale:
            return None
        return Cached(entry.value, age, True)

    def _finish(self, key: Hashable, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.done.set()

    # -- public API -----------------------------------------------------------------

    async def get_or_fetch(
        self,
        key: Hashable,
        fetch: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        method: str | None = None,
        shared: bool = False,
    ) -> Cached[T]:
        """The cached value for ``key``, calling ``fetch()`` on a miss.

        Args:
            key: e.g. :func:`cache_key` of the upstream call.
            fetch: called at most once at a time per key; its result is cached.
            ttl: seconds to keep the result; default ``method_ttls[method]``, then
                ``ttl`` from the config. ``0`` means never served from cache (but still
                single-flight and kept for stale-if-error).
            method: selects the per-method TTL.
            shared: the value belongs to the shared state (stored in its own
                partition, out of reach of user lookups' evictions).

        Raises:
            Whatever ``fetch()`` raised, unless it was an UpstreamError/Overloaded
            and a last-good value younger than ``max_stale`` exists (then that value
            is returned with ``stale=True``). Every caller that shared the fetch
            gets the same outcome.
        """
        while True:
            cached = self._lookup(key)
            if cached is not None:
                self._hits += 1
                await trio.lowlevel.checkpoint()
                return cached
            flight = self._flights.get(key)
            if flight is None:
                self._misses += 1
                return await self._fetch(key, fetch, self._ttl_for(ttl, method), shared)
            self._coalesced += 1
            await flight.done.wait()
            if flight.error is not None:
                # The same exception object for every waiter: reset its traceback so
                # it does not grow with each re-raise.
                raise flight.error.with_traceback(flight.tb)
            if flight.result is not None:
                if flight.result.stale:
                    self._stale_served += 1
                return flight.result
            # The fetcher was cancelled: loop, and the first waiter to get here fetches.

    async def _fetch(self, key: Hashable, fetch: Callable[[], Awaitable[T]], ttl: float, shared: bool) -> Cached[T]:
        flight = self._flights[key] = _Flight()
        try:
            value = await fetch()
        except _STALE_OK as exc:
            self._errors += 1
            stale = self._fallback(key)
            if stale is None:
                flight.error, flight.tb = exc, exc.__traceback__
                raise
            self._stale_served += 1
            flight.result = stale
            return stale
        except Exception as exc:
            self._errors += 1
            flight.error, flight.tb = exc, exc.__traceback__
            raise
        else:
            flight.result = self._store(key, value, ttl, shared)
            return flight.result
        finally:
            # Also on Cancelled/KeyboardInterrupt: result and error stay None, so the
            # waiters retry instead of hanging.
            self._finish(key, flight)

    def peek(self, key: Hashable, *, allow_stale: bool = False) -> Cached[Any] | None:
        """The fresh value for ``key`` without fetching and without counting.

        Args:
            allow_stale: if nothing fresh, return the last good value younger than
                ``max_stale`` (``stale=True``).
        """
        cached = self._lookup(key)
        if cached is None and allow_stale:
            cached = self._fallback(key)
        return cached

    def would_fetch(self, key: Hashable) -> bool:
        """Whether a lookup of ``key`` now would run a fetch (nothing fresh, none in flight)."""
        return key not in self._flights and self._lookup(key) is None

    def get(self, key: Hashable) -> Cached[Any] | None:
        """The fresh value for ``key``, counted as a hit, or None (counted as a miss).

        For callers that fetch many keys in one upstream call themselves and
        :meth:`put` the results (e.g. token balances read with getMultipleAccounts).
        """
        cached = self._lookup(key)
        if cached is None:
            self._misses += 1
        else:
            self._hits += 1
        return cached

    def put(
        self, key: Hashable, value: Any, *, ttl: float | None = None, method: str | None = None, shared: bool = False
    ) -> None:
        """Store a value fetched by the caller (TTL and ``shared`` as in :meth:`get_or_fetch`)."""
        self._store(key, value, self._ttl_for(ttl, method), shared)

    def invalidate(self, key: Hashable) -> None:
        """Forget the fresh value: the next lookup fetches.

        The last good value is kept, so a failing refetch can still serve it stale.
        A fetch already in flight is not affected.
        """
        self._state.fresh.pop(key, None)
        self._user.fresh.pop(key, None)

    def stats(self) -> dict[str, Any]:
        """A JSON-serializable snapshot.

        ``misses`` counts lookups that ran ``fetch()``; ``coalesced`` those that shared
        another caller's fetch; ``hit_rate`` is hits over all lookups. ``size``,
        ``last_good`` and ``evictions`` are totals; ``partitions`` has them per partition.
        """
        lookups = self._hits + self._misses + self._coalesced
        state, user = self._state.stats(self._cfg.state_maxsize), self._user.stats(self._cfg.maxsize)
        return {
            "size": state["size"] + user["size"],  # expires lazily; len() purges first
            "maxsize": self._cfg.maxsize,  # cache.maxsize: the user lookups' bound
            "last_good": state["last_good"] + user["last_good"],
            "hits": self._hits,
            "misses": self._misses,
            "hit_rate": self._hits / lookups if lookups else 0.0,
            "evictions": state["evictions"] + user["evictions"],
            "coalesced": self._coalesced,
            "inflight": len(self._flights),
            "stale_served": self._stale_served,
            "errors": self._errors,
            "partitions": {"state": state, "user": user},
        }
