"""Component statistics -> the /stats JSON and the /metrics Prometheus text.

Each component owns a ``stats()`` snapshot (plain JSON data). /stats is those snapshots,
one section per component. /metrics follows Prometheus' conventions: counters end in
``_total``, durations are histograms in seconds, variable parts (route, method, field,
partition, endpoint) are labels, never parts of a name. Its figures come from the same
snapshots (:data:`SPECS` says which leaf is which metric) and from the histograms and
labelled counters of :class:`~edgestate.telemetry.Telemetry`. Percentiles, averages and
rates of /stats are left out: Prometheus computes them, across processes too, from the
histograms and counters. In a worker group every series carries a ``worker`` label.

A numeric figure no spec names (a component grew a new key) is still exported, as a
gauge named by its path, so nothing in /stats is missing from /metrics; docs/metrics.md
lists the named ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from . import __version__
from .refresh import SECONDS_PER_MONTH
from .telemetry import Counter, Histogram

if TYPE_CHECKING:
    from .services import Services

PREFIX = "edgestate_"
_NAME_OK = re.compile(r"^[a-z_][a-z0-9_]*$")


def collect(services: Services) -> dict[str, Any]:
    """Every component's snapshot, keyed by component (the /stats document)."""
    # Feed mode (a child): no pool and no refresher; the parent is the only upstream.
    pool = services.pool.stats() if services.pool is not None else {"mode": "feed"}
    limiter = services.limiter.stats()
    # Credits (monthly, per provider) are the pool's meter; the limiter counts requests.
    credits_per_s = float(pool.get("credits_per_second", 0.0))
    price_limiter = getattr(services.prices, "limiter", None)
    price_rps = price_limiter.observed_rate() if price_limiter is not None else 0.0
    refresher = services.refresher.stats() if services.refresher is not None else {"mode": "feed", "pubsub": None}
    if services.refresher is not None:
        budget = services.refresher.budget_stats()
    else:
        budget = {"credits_per_month": services.cfg.upstream.credits_per_month, "projected_monthly_credits": 0,
                  "note": "a child never calls the providers: the root's /stats has the tree's burn"}
    feed = {"feed": services.feed.stats()} if services.feed is not None else {}
    return {
        "server": {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(trio.current_time() - services.started_at, 3),
            "config": services.cfg.source,
            "worker": services.worker,
        },
        "pool": pool,
        "rate_limiter": limiter,
        "cache": services.cache.stats(),
        "upstream": {
            "endpoints": pool.get("endpoints", []),
            "calls_by_method": pool.get("calls_by_method", {}),
            "credits_per_second": round(credits_per_s, 6),
            "projected_monthly_credits": round(credits_per_s * SECONDS_PER_MONTH),
            "projected_monthly_credits_by_provider": {
                str(e["url"]): e.get("projected_monthly_credits", 0) for e in pool.get("endpoints", []) if isinstance(e, dict)
            },
            "requests_per_second": pool.get("requests_per_second", 0.0),
            "price_requests_per_second": round(price_rps, 3),
            "projected_monthly_price_requests": round(price_rps * SECONDS_PER_MONTH),
            "pubsub": refresher["pubsub"],
            "prices": services.prices.stats(),
            "budget": budget,
            "failing": services.telemetry.failing(),
        },
        **feed,
        "state": {**services.state.stats(), "refresh": refresher},
        "broadcaster": services.hub.stats(),
        **{name: section() for name, section in services.extra_stats.items()},
    }


# -- which /stats leaf is which metric ---------------------------------------------------

COUNTER, GAUGE = "counter", "gauge"


@dataclass(frozen=True, slots=True)
class Spec:
    """One /stats leaf (or a set of them) as one metric.

    ``path`` is dotted; ``*`` walks every key of a table, binding it to the next of
    ``labels``; ``[url]`` walks a list, binding each item's ``url``.
    """

    path: str
    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    const: Mapping[str, str] = field(default_factory=dict)


SPECS: tuple[Spec, ...] = (
    # WebSocket clients and fan-out
    Spec("broadcaster.subscribers", "ws_clients", GAUGE, "WebSocket clients connected now."),
    Spec("broadcaster.peak", "ws_clients_peak", GAUGE, "Most WebSocket clients connected at once."),
    Spec("broadcaster.max_clients", "ws_max_clients", GAUGE, "ws.max_clients: over it clients get close 1013."),
    Spec("broadcaster.connected_total", "ws_connections_total", COUNTER, "WebSocket clients accepted."),
    Spec("broadcaster.frames_sent", "ws_messages_sent_total", COUNTER, "Messages sent to WebSocket clients."),
    Spec("broadcaster.updates", "broadcasts_total", COUNTER, "State changes fanned out to every client."),
    Spec("broadcaster.conflated", "ws_conflated_total", COUNTER,
         "States a slow client skipped (it got a newer one instead)."),
    Spec("broadcaster.slow_clients_closed", "ws_clients_closed_total", COUNTER,
         "WebSocket clients closed by the server.", const={"reason": "slow"}),
    Spec("broadcaster.dead_clients_closed", "ws_clients_closed_total", COUNTER,
         "WebSocket clients closed by the server.", const={"reason": "no_pong"}),
    Spec("broadcaster.refused_full", "refusals_total", COUNTER, "Requests and connections refused before a route ran.",
         const={"where": "ws", "reason": "1013"}),
    Spec("broadcaster.refused_handshake", "refusals_total", COUNTER,
         "Requests and connections refused before a route ran.", const={"where": "ws", "reason": "handshake"}),
    # HTTP
    Spec("api.served_from_memory", "http_served_from_memory_total", COUNTER,
         "HTTP answers served from the in-memory state."),
    Spec("api.not_modified", "http_not_modified_total", COUNTER, "HTTP 304 answers (If-None-Match matched)."),
    Spec("api.rate_limited", "http_rate_limited_total", COUNTER, "HTTP requests answered 429 (per-client limits)."),
    Spec("connections.open", "connections", GAUGE, "TCP connections open now."),
    Spec("connections.capacity", "connections_capacity", GAUGE,
         "Connections this process may hold (config, capped by the open-files limit)."),
    Spec("connections.clients", "connection_clients", GAUGE, "Distinct client addresses connected now."),
    Spec("connections.accepted", "connections_accepted_total", COUNTER, "TCP connections accepted."),
    Spec("rpc.pubsub.clients.connected_total", "rpc_ws_connections_total", COUNTER,
         "/rpc WebSocket (PubSub) clients accepted."),
    Spec("connections.failures", "connection_failures_total", COUNTER, "Connections ended by an unexpected error."),
    Spec("connections.handed_to_app", "connections_handed_to_app_total", COUNTER,
         "Connections passed to the Quart app (routes not answered from memory)."),
    # Cache
    Spec("cache.hits", "cache_requests_total", COUNTER, "Cache lookups by result.", const={"result": "hit"}),
    Spec("cache.misses", "cache_requests_total", COUNTER, "Cache lookups by result.", const={"result": "miss"}),
    Spec("cache.coalesced", "cache_requests_total", COUNTER, "Cache lookups by result.",
         const={"result": "coalesced"}),
    Spec("cache.stale_served", "cache_stale_served_total", COUNTER,
         "Last-good values served because the upstream failed."),
    Spec("cache.errors", "cache_fetch_errors_total", COUNTER, "Cache fetches that failed."),
    Spec("cache.inflight", "cache_inflight", GAUGE, "Fetches in flight now."),
    Spec("cache.partitions.*.size", "cache_entries", GAUGE, "Entries held, by partition.", ("partition",)),
    Spec("cache.partitions.*.maxsize", "cache_max_entries", GAUGE, "Entry bound, by partition.", ("partition",)),
    Spec("cache.partitions.*.last_good", "cache_last_good_entries", GAUGE,
         "Last-good values kept for stale-if-error, by partition.", ("partition",)),
    Spec("cache.partitions.*.evictions", "cache_evictions_total", COUNTER, "LRU evictions, by partition.",
         ("partition",)),
    # Upstream: pool, rate limiters, credits
    Spec("pool.connections", "upstream_pool_connections", GAUGE, "upstream.max_connections."),
    Spec("pool.active", "upstream_pool_active", GAUGE, "Upstream HTTP requests in flight now."),
    Spec("pool.queued", "upstream_pool_queued", GAUGE, "Upstream calls waiting for a batch."),
    Spec("pool.http_requests", "upstream_http_requests_total", COUNTER,
         "HTTP requests sent to the RPC provider (a batch is one)."),
    Spec("pool.batches", "upstream_batches_total", COUNTER, "Batches sent to the RPC provider."),
    Spec("pool.merged", "upstream_merged_calls_total", COUNTER,
         "Calls merged into another (duplicate reads, getMultipleAccounts)."),
    Spec("pool.retries", "upstream_retries_total", COUNTER, "Upstream attempts retried."),
    Spec("pool.endpoints.[url].healthy", "upstream_endpoint_healthy", GAUGE,
         "1 when the RPC endpoint is in service.", ("endpoint",)),
    Spec("pool.endpoints.[url].failures", "upstream_endpoint_failures", GAUGE,
         "Consecutive failures of the RPC endpoint.", ("endpoint",)),
    Spec("rate_limiter.granted_cost", "provider_credits_total", COUNTER,
         "Provider credits spent (each JSON-RPC call, batch items included, at its method cost)."),
    Spec("upstream.credits_per_second", "provider_credits_per_second", GAUGE,
         "Provider credits per second over the last seconds."),
    Spec("upstream.projected_monthly_credits", "provider_projected_monthly_credits", GAUGE,
         "Credits 30 days at the current rate would cost."),
    Spec("upstream.budget.credits_per_month", "provider_credits_budget", GAUGE,
         "upstream.credits_per_month (0: no budget)."),
    Spec("upstream.budget.interval_scale", "polling_interval_scale", GAUGE,
         "Factor the budget stretches polling intervals by (1: none)."),
    Spec("rate_limiter.limit", "rate_limit_per_second", GAUGE, "Configured rate limit.", const={"limiter": "upstream"}),
    Spec("rate_limiter.tokens", "rate_limit_tokens", GAUGE, "Tokens in the bucket now.", const={"limiter": "upstream"}),
    Spec("rate_limiter.queued.*", "rate_limit_queued", GAUGE, "Callers waiting for a token, by priority.",
         ("priority",), const={"limiter": "upstream"}),
    Spec("rate_limiter.granted", "rate_limit_granted_total", COUNTER, "Tokens granted.",
         const={"limiter": "upstream"}),
    Spec("rate_limiter.rejected", "rate_limit_rejected_total", COUNTER, "Requests refused by the limiter.",
         const={"limiter": "upstream"}),
    Spec("rate_limiter.penalties", "rate_limit_penalties_total", COUNTER,
         "429s from the provider that paused the limiter.", const={"limiter": "upstream"}),
    Spec("upstream.prices.rate_limiter.limit", "rate_limit_per_second", GAUGE, "Configured rate limit.",
         const={"limiter": "price"}),
    Spec("upstream.prices.rate_limiter.tokens", "rate_limit_tokens", GAUGE, "Tokens in the bucket now.",
         const={"limiter": "price"}),
    Spec("upstream.prices.rate_limiter.queued.*", "rate_limit_queued", GAUGE,
         "Callers waiting for a token, by priority.", ("priority",), const={"limiter": "price"}),
    Spec("upstream.prices.rate_limiter.granted", "rate_limit_granted_total", COUNTER, "Tokens granted.",
         const={"limiter": "price"}),
    Spec("upstream.prices.rate_limiter.rejected", "rate_limit_rejected_total", COUNTER,
         "Requests refused by the limiter.", const={"limiter": "price"}),
    Spec("upstream.prices.rate_limiter.penalties", "rate_limit_penalties_total", COUNTER,
         "429s from the provider that paused the limiter.", const={"limiter": "price"}),
    # Price API
    Spec("upstream.prices.requests", "price_http_requests_total", COUNTER, "HTTP requests sent to the price API."),
    Spec("upstream.prices.ids_requested", "price_ids_requested_total", COUNTER, "Mints asked of the price API."),
    Spec("upstream.prices.queued", "price_queued_mints", GAUGE, "Mints waiting for a price request."),
    Spec("upstream.prices.max_pending", "price_max_queued_mints", GAUGE, "price.max_pending_mints."),
    Spec("upstream.prices.rejected", "price_rejected_total", COUNTER, "Price lookups refused (queue full)."),
    Spec("upstream.prices.dropped", "price_dropped_total", COUNTER, "Queued mints nobody waited for any more."),
    Spec("upstream.prices.retries", "price_retries_total", COUNTER, "Price API requests retried."),
    # PubSub
    Spec("state.refresh.pubsub.up", "pubsub_up", GAUGE, "1 while the provider's PubSub WebSocket is subscribed."),
    Spec("state.refresh.pubsub.subscriptions_made", "pubsub_subscriptions_total", COUNTER, "PubSub subscriptions made."),
    Spec("state.refresh.pubsub.reconnects", "pubsub_reconnects_total", COUNTER, "PubSub reconnects."),
    Spec("state.refresh.pubsub.notifications", "pubsub_notifications_total", COUNTER, "PubSub notifications received."),
    # State
    Spec("state.fields.*.age_s", "state_age_seconds", GAUGE,
         "Seconds since the field was last confirmed from upstream.", ("field",)),
    Spec("state.version", "state_version", GAUGE, "Version of the shared state (one per change)."),
    Spec("state.ready", "state_ready", GAUGE, "1 when /ready answers 200."),
    Spec("state.updates_published", "state_updates_total", COUNTER, "Changes of the shared state."),
    Spec("state.confirmations_unchanged", "state_confirmations_unchanged_total", COUNTER,
         "Upstream reads that confirmed an unchanged value."),
    Spec("state.dropped_older_slot", "state_dropped_older_slot_total", COUNTER,
         "Upstream values ignored as older than the one held."),
    Spec("state.writes_by_source.*", "state_writes_total", COUNTER, "Values written to the state, by source.",
         ("source",)),
    Spec("state.refresh.polls.*", "state_polls_total", COUNTER, "Polls of a state field.", ("field",)),
    Spec("state.refresh.errors.*", "state_poll_errors_total", COUNTER, "Failed polls of a state field.", ("field",)),
    # Feed mode (a child of another edgestate)
    Spec("feed.connected", "feed_connected", GAUGE, "1 while connected to the parent edgestate."),
    Spec("feed.parent_stale", "feed_parent_stale", GAUGE, "1 while the parent reports a stale state."),
    Spec("feed.connects", "feed_connects_total", COUNTER, "Connections made to the parent."),
    Spec("feed.reconnects", "feed_reconnects_total", COUNTER, "Reconnects to the parent."),
    Spec("feed.updates_applied", "feed_updates_total", COUNTER, "States taken from the parent."),
    Spec("feed.ignored_older", "feed_ignored_older_total", COUNTER, "Parent states older than the one held."),
    Spec("feed.last_update_age_s", "feed_last_update_age_seconds", GAUGE, "Seconds since the parent's last state."),
    Spec("feed.forwarded_requests", "feed_forwarded_requests_total", COUNTER, "Lookups forwarded to the parent."),
    Spec("feed.forward_errors", "feed_forward_errors_total", COUNTER, "Forwarded lookups that failed."),
    # Process
    Spec("server.uptime_s", "uptime_seconds", GAUGE, "Seconds since the server started."),
)

# Leaves deliberately not exported: percentiles and averages (use the histograms),
# ratios and rates (use rate() of the counters), and figures exported elsewhere.
_NOT_EXPORTED = (
    "server.pid", "server.worker", "pool.idle", "pool.calls", "pool.errors", "pool.timeouts", "pool.overloaded",
    "pool.avg_batch_size", "pool.latency_ms", "pool.calls_by_method", "pool.credits_per_second",
    "pool.projected_monthly_credits", "rate_limiter.burst", "rate_limiter.current_rate",
    "rate_limiter.rejection_rate", "rate_limiter.paused_for", "rate_limiter.observed_rate", "cache.size",
    "cache.maxsize", "cache.last_good", "cache.hit_rate", "cache.evictions", "upstream.endpoints",
    "upstream.calls_by_method", "upstream.pubsub", "upstream.failing", "upstream.budget.projected_monthly_credits",
    "upstream.budget.max_interval_scale", "upstream.prices.batches", "upstream.prices.avg_ids_per_request",
    "upstream.prices.timeouts", "upstream.prices.errors", "upstream.prices.latency_last_s",
    "upstream.prices.latency_p50_s", "upstream.prices.latency_p99_s", "upstream.prices.rate_limiter",
    "state.fields", "state.subscribers", "state.refresh", "broadcaster.last_broadcast_ms",
    "broadcaster.p99_broadcast_ms", "broadcaster.last_broadcast_cpu_ms", "api", "connections.refused_full",
    "connections.refused_per_client", "connections.bad_requests", "connections.head_timeouts", "workers",
    "feed.parent", "feed.parents",
)


def _walk(doc: Any, parts: list[str], labels: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if not parts:
        yield labels, doc
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(doc, Mapping):
            for key, sub in doc.items():
                yield from _walk(sub, rest, (*labels, str(key)))
    elif head.startswith("["):
        if isinstance(doc, list):
            for item in doc:
                if isinstance(item, Mapping):
                    yield from _walk(item, rest, (*labels, str(item.get(head[1:-1], ""))))
    elif isinstance(doc, Mapping) and head in doc:
        yield from _walk(doc[head], rest, labels)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _covered() -> tuple[str, ...]:
    paths = [s.path.split(".*")[0].split(".[")[0] for s in SPECS]
    return tuple(p + "." for p in (*paths, *_NOT_EXPORTED))


_COVERED = _covered()


def _unnamed(doc: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves no spec covers, as (dotted path, value)."""
    if (path + ".").startswith(_COVERED) or path + "." in _COVERED:
        return
    if isinstance(doc, Mapping):
        for key, sub in doc.items():
            key = str(key)
            if _NAME_OK.match(key):  # a table keyed by data (methods, URLs) has no names to offer
                yield from _unnamed(sub, f"{path}.{key}" if path else key)
        return
    value = _number(doc)
    if value is not None and path:
        yield path, value


class _Families:
    """Families by name, each with one label set (the first seen), plus the worker label."""

    def __init__(self, worker: str | None) -> None:
        self.worker = worker
        self.families: dict[str, Metric] = {}
        self._plain: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        self._label_names: dict[str, tuple[str, ...]] = {}

    def _labels(self, names: tuple[str, ...]) -> list[str]:
        return [*names, "worker"] if self.worker is not None else list(names)

    def _values(self, values: tuple[str, ...]) -> list[str]:
        return [*values, self.worker] if self.worker is not None else list(values)

    def add(self, kind: str, name: str, help_: str, labels: tuple[str, ...], values: tuple[str, ...],
            value: float) -> None:
        full = PREFIX + name
        family = self._plain.get(full)
        if family is None:
            if kind == COUNTER:
                family = CounterMetricFamily(full.removesuffix("_total"), help_, labels=self._labels(labels))
            else:
                family = GaugeMetricFamily(full, help_, labels=self._labels(labels))
            self.families[full] = self._plain[full] = family
            self._label_names[full] = labels
        if self._label_names[full] != labels:
            return  # keep the exposition parseable: one label set per family
        family.add_metric(self._values(values), value)

    def counter(self, name: str, help_: str, counter: Counter) -> None:
        for values, value in sorted(counter.values.items()):
            self.add(COUNTER, name, help_, counter.label_names, values, value)
        if not counter.values and not counter.label_names:
            self.add(COUNTER, name, help_, (), (), 0.0)

    def histogram(self, name: str, help_: str, histogram: Histogram) -> None:
        full = PREFIX + name
        family = HistogramMetricFamily(full, help_, labels=self._labels(histogram.label_names))
        for values, buckets, total in histogram.samples():
            family.add_metric(self._values(values), buckets, total)
        self.families[full] = family


def families(services: Services, doc: Mapping[str, Any] | None = None) -> list[Metric]:
    """Every metric of this process, as prometheus-client families."""
    doc = collect(services) if doc is None else doc
    worker = services.worker
    out = _Families(str(worker["id"]) if worker is not None else None)
    out.add(GAUGE, "build_info", "The running edgestate's version (always 1).", ("version",), (__version__,), 1.0)
    tel = services.telemetry
    out.counter("http_requests_total", "HTTP requests answered, by route and status.", tel.http_requests)
    out.histogram("http_request_duration_seconds", "Time to answer an HTTP request, by route.", tel.http_duration)
    out.counter("upstream_requests_total",
                "Upstream calls by upstream (rpc, price), method and outcome (queueing and retries included).",
                tel.upstream_requests)
    out.histogram("upstream_request_duration_seconds",
                  "Time an upstream call took for its caller (queueing, batching, retries included).",
                  tel.upstream_duration)
    out.histogram("broadcast_duration_seconds", "Time to fan one new state out to every WebSocket client.",
                  tel.broadcast_duration)
    for values, value in sorted(tel.refusals.values.items()):
        out.add(COUNTER, "refusals_total", "Requests and connections refused before a route ran.",
                tel.refusals.label_names, values, value)
    for spec in SPECS:
        for values, leaf in _walk(doc, spec.path.split("."), ()):
            number = _number(leaf)
            if number is None:
                continue
            names = (*spec.labels, *spec.const)
            out.add(spec.kind, spec.name, spec.help, names, (*values, *spec.const.values()), number)
    for path, value in _unnamed(doc):
        name = re.sub(r"[^a-z0-9_]", "_", path.replace(".", "_"))
        if PREFIX + name not in out.families:
            out.add(GAUGE, name, f"/stats {path}", (), (), value)
    return list(out.families.values())


class _Collector:
    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[Metric]:
        yield from families(self._services)


def prometheus_text(services: Services) -> bytes:
    """This process's metrics in Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(services))
    return generate_latest(registry)
