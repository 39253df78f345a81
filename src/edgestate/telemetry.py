"""Counters and histograms the components update in place, for /metrics.

The lowest module of the package (it imports nothing of ours), so that any component
can hold a :class:`Telemetry` without an import cycle. Updates are plain ``def``s that
never wait: a histogram observation is a bisect and two additions. metrics.py turns
these into Prometheus families; /stats keeps its own JSON figures.

Label values that may come from clients (JSON-RPC methods through /rpc, routes) are
bounded: past ``MAX_SERIES`` distinct label sets a family folds new ones into
``"other"``, so no client can grow the exposition without limit.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("edgestate.upstream")

# Outcomes that mean the upstream itself is failing (not one call refused, not us cancelling).
OUTAGE_OUTCOMES = frozenset({"error", "timeout", "rate_limited"})
_NAMES = {"rpc": "Solana RPC", "price": "price API", "pubsub": "Solana PubSub"}

MAX_SERIES = 500  # distinct label sets per family; more are folded into "other"

# Seconds. HTTP answers from memory take ~0.1 ms, upstream calls 10 ms-30 s, a fan-out
# to 100k clients ~1 s: one bucket list covers all three at Prometheus' usual spacing.
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[str, ...]


def _bounded(series: dict[Labels, object], labels: Labels) -> Labels:
    if labels in series or len(series) < MAX_SERIES:
        return labels
    return tuple("other" for _ in labels)


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, *label_names: str) -> None:
        self.label_names = label_names
        self.values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (default 1) to the series of ``labels``."""
        key = _bounded(self.values, labels)  # type: ignore[arg-type]
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, *labels: str) -> float:
        """The current count of ``labels`` (0 when never incremented)."""
        return self.values.get(labels, 0.0)

    def total(self) -> float:
        """The sum over every label set."""
        return sum(self.values.values())


class _Series:
    __slots__ = ("counts", "sum")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n  # per bucket, not cumulative (+Inf last)
        self.sum = 0.0


class Histogram:
    """Observations in fixed buckets (seconds), per label set, as Prometheus expects."""

    def __init__(self, *label_names: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.label_names = label_names
        self.buckets = buckets
        self._series: dict[Labels, _Series] = {}

    def observe(self, seconds: float, *labels: str) -> None:
        """Record one observation of ``seconds`` for ``labels``."""
        key = _bounded(self._series, labels)  # type: ignore[arg-type]
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self.buckets) + 1)
        series.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        series.sum += seconds

    def samples(self) -> Iterator[tuple[Labels, list[tuple[str, float]], float]]:
        """(labels, cumulative [(le, count)] ending with "+Inf", sum) per label set."""
        for labels, series in self._series.items():
            running = 0
            cumulative = []
            for bound, count in zip((*map(repr, self.buckets), "+Inf"), series.counts, strict=True):
                running += count
                cumulative.append((bound, float(running)))
            yield labels, cumulative, series.sum

    def count(self, *labels: str) -> int:
        """Observations recorded for ``labels``."""
        series = self._series.get(labels)
        return sum(series.counts) if series is not None else 0


class Telemetry:
    """The counters and histograms of one server process (Services.telemetry).

    Attributes:
        http_requests: finished HTTP requests by (route, status).
        http_duration: their durations in seconds, by route.
        upstream_requests: upstream calls by (upstream, method, outcome); outcome is
            ok, error, timeout, rate_limited or overloaded.
        upstream_duration: their durations in seconds (queueing and retries included), by upstream.
        broadcast_duration: seconds one fan-out of a new state to every client took.
        refusals: requests and connections refused before a route ran, by (where, reason).
    """

    def __init__(self) -> None:
        self.http_requests = Counter("route", "status")
        self.http_duration = Histogram("route")
        self.upstream_requests = Counter("upstream", "method", "outcome")
        self.upstream_duration = Histogram("upstream")
        self.broadcast_duration = Histogram()
        self.refusals = Counter("where", "reason")
        # upstream -> (wall-clock start of its outage, failed calls since): one line per outage.
        self._outages: dict[str, tuple[float, int]] = {}

    def upstream_call(self, upstream: str, method: str, outcome: str, seconds: float) -> None:
        """Count one finished upstream call and its duration (an ``ok`` ends an outage)."""
        self.upstream_requests.inc(upstream, method, outcome)
        self.upstream_duration.observe(seconds, upstream)
        if outcome == "ok" and upstream in self._outages:
            since, failures = self._outages.pop(upstream)
            log.info("%s recovered after %.1fs (%d failed calls)", _NAMES.get(upstream, upstream),
                     time.time() - since, failures)

    def note_failure(self, upstream: str, outcome: str, exc: BaseException) -> None:
        """A failed call: the first of an outage is logged as a warning, the rest only counted."""
        if outcome not in OUTAGE_OUTCOMES:
            return
        outage = self._outages.get(upstream)
        if outage is not None:
            self._outages[upstream] = (outage[0], outage[1] + 1)
            return
        self._outages[upstream] = (time.time(), 1)
        log.warning("%s failing (%s): %s; further failures are counted, not logged, until it recovers",
                    _NAMES.get(upstream, upstream), outcome.replace("_", " "), describe(exc))

    def failing(self) -> list[str]:
        """The upstreams in an outage now."""
        return sorted(self._outages)

    def refused(self, where: str, reason: str) -> None:
        """Count one refusal (``where``: http, ws, connection; ``reason``: e.g. "403")."""
        self.refusals.inc(where, reason)


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of an upstream call that raised ``exc``."""
    from .errors import Overloaded, RateLimited, RpcError, UpstreamTimeout

    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, RateLimited) or "429" in str(exc) or "rate limited" in str(exc):
        return "rate_limited"
    if isinstance(exc, RpcError):
        return "rpc_error"  # the provider answered: this call was refused, the upstream is fine
    if not isinstance(exc, Exception):
        return "cancelled"
    return "error"


def describe(exc: BaseException) -> str:
    """One readable line for an exception: its message, else its type (never a repr).

    A closed WebSocket (trio-websocket's ``ConnectionClosed``, whose ``str()`` is a repr
    of its close reason) reads as ``connection closed (1006 ABNORMAL_CLOSURE: why)``.
    """
    reason = getattr(exc, "reason", None)
    code = getattr(reason, "code", None)
    if isinstance(code, int):
        name = getattr(reason, "name", "") or ""
        why = getattr(reason, "reason", "") or ""
        return f"connection closed ({code}{' ' + name if name else ''}{': ' + why if why else ''})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
