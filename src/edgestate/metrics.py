"""Component statistics -> the /stats JSON and the /metrics Prometheus text.

Each component owns a ``stats()`` snapshot (plain JSON data). /stats is those snapshots,
one section per component; /metrics exposes every numeric leaf of the same data as a
gauge, so both always show the same figures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from . import __version__
from .refresh import SECONDS_PER_MONTH

if TYPE_CHECKING:
    from .services import Services

_NAME_OK = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def collect(services: Services) -> dict[str, Any]:
    """Every component's snapshot, keyed by component (the /stats document)."""
    # Feed mode (a child): no pool and no refresher; the parent is the only upstream.
    pool = services.pool.stats() if services.pool is not None else {"mode": "feed"}
    limiter = services.limiter.stats()
    credits_per_s = services.limiter.observed_rate()
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
            "credits_per_second": round(credits_per_s, 3),
            "projected_monthly_credits": round(credits_per_s * SECONDS_PER_MONTH),
            "pubsub": refresher["pubsub"],
            "prices": services.prices.stats(),
            "budget": budget,
        },
        **feed,
        "state": {**services.state.stats(), "refresh": refresher},
        "broadcaster": services.hub.stats(),
        **{name: section() for name, section in services.extra_stats.items()},
    }


def _leaves(prefix: str, value: Any, labels: dict[str, str]) -> Iterator[tuple[str, dict[str, str], float]]:
    if isinstance(value, bool):
        yield prefix, labels, float(value)
    elif isinstance(value, (int, float)):
        yield prefix, labels, float(value)
    elif isinstance(value, Mapping):
        for key, sub in value.items():
            key = str(key)
            if _NAME_OK.match(key):
                yield from _leaves(f"{prefix}_{key}", sub, labels)
            else:  # e.g. a route or a URL: a label, not part of the name
                yield from _leaves(prefix, sub, {**labels, "key": key})
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            label = sub.get("url") if isinstance(sub, Mapping) and "url" in sub else str(i)
            yield from _leaves(prefix, sub, {**labels, "item": str(label)})


class _Collector:
    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        label_names: dict[str, tuple[str, ...]] = {}
        for name, labels, value in _leaves("edgestate", collect(self._services), {}):
            names = tuple(sorted(labels))
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, f"edgestate {name[10:]}", labels=names)
                label_names[name] = names
            if label_names[name] != names:  # same name, other label set: skip, keep it parseable
                continue
            family.add_metric([labels[n] for n in names], value)
        yield from families.values()


def prometheus_text(services: Services) -> bytes:
    """The figures of :func:`collect` in Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(services))
    return generate_latest(registry)
