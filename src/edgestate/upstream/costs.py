"""What the upstream costs: credits per provider as they are spent, and a config's forecast.

Two budgets, kept apart as the providers keep them:

* **request rate** (per second, each JSON-RPC call and batch item counted once, with
  per-method limits such as getProgramAccounts): enforced by the pool's rate limiters;
* **credits** (per month, per provider account, ``upstream.method_costs``): counted here by
  :class:`CreditMeter` for every request sent, projected to a month and compared with
  ``upstream.credits_per_month`` by the refresher.

:func:`forecast` works out from a configuration alone what it will cost a month, and
:func:`cost_line` says it in one line, naming any limit of ``upstream.plan`` (or of the
price API's plan) the configuration exceeds; ``serve`` and ``check-config`` print it.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config import JUPITER_KEY_RPS, JUPITER_KEYLESS_RPS, PROVIDER_PLANS, Config

SECONDS_PER_MONTH = 30 * 86400
_BUCKET_S = 60.0  # the meter keeps per-minute sums
_WINDOW_BUCKETS = 60  # ... for the last hour: one reconciliation every 10 min is a few buckets
# Helius bills each new WebSocket connection 1 credit and streamed data 2 credits per 0.1 MB.
WS_CONNECT_CREDITS = 1.0
WS_CREDITS_PER_BYTE = 2.0 / 100_000


class CreditMeter:
    """Credits spent per provider (endpoint label): totals and a projection to a month.

    The projection is the average over the last hour (or since the first credit, when
    that is shorter): a reconciliation every ten minutes would make a 10-second window
    swing between nothing and millions.
    """

    def __init__(self) -> None:
        self._totals: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._buckets: dict[str, collections.deque[list[float]]] = {}
        self._since: dict[str, float] = {}

    def add(self, provider: str, credits: float) -> None:
        """Record ``credits`` spent at ``provider`` now (sync)."""
        if credits <= 0:
            return
        now = trio.current_time()
        self._totals[provider] += credits
        self._since.setdefault(provider, now)
        buckets = self._buckets.setdefault(provider, collections.deque(maxlen=_WINDOW_BUCKETS + 1))
        index = math.floor(now / _BUCKET_S)
        if buckets and buckets[-1][0] == index:
            buckets[-1][1] += credits
        else:
            buckets.append([index, credits])

    def total(self, provider: str | None = None) -> float:
        """Credits spent since start, at one provider or at all of them."""
        return float(self._totals.get(provider, 0.0) if provider is not None else sum(self._totals.values()))

    def per_second(self, provider: str) -> float:
        """The recent spending rate at ``provider`` (credits/s; see the class docstring)."""
        now = trio.current_time()
        buckets = self._buckets.get(provider)
        if not buckets:
            return 0.0
        first = math.floor(now / _BUCKET_S) - _WINDOW_BUCKETS + 1
        spent = sum(c for index, c in buckets if index >= first)
        # Over at least one bucket: a request a second ago is not "a month of them".
        span = max(_BUCKET_S, min(now - self._since[provider], _WINDOW_BUCKETS * _BUCKET_S))
        return spent / span

    def projected_per_month(self, provider: str | None = None) -> float:
        """Credits a month at the recent rate, at one provider or at all of them."""
        providers = [provider] if provider is not None else list(self._totals)
        return sum(self.per_second(p) for p in providers) * SECONDS_PER_MONTH

    def stats(self) -> dict[str, Any]:
        """JSON-ready: per provider total, rate and monthly projection."""
        by = {
            p: {
                "total": round(self._totals[p], 3),
                "per_second": round(self.per_second(p), 6),
                "projected_per_month": round(self.per_second(p) * SECONDS_PER_MONTH),
            }
            for p in self._totals
        }
        return {"by_provider": by, "projected_per_month": round(self.projected_per_month())}


@dataclass(frozen=True, slots=True)
class Forecast:
    """A configuration's monthly cost, worked out from its intervals alone."""

    credits_pushed: float  # PubSub up: participants pushed, a recount every reconcile interval
    credits_polling: float  # PubSub down: everything polled
    price_requests: float
    price_rps: float
    exceeded: list[str] = field(default_factory=list)  # "what > plan limit" lines
    plan_label: str | None = None
    plan_credits: float = 0.0


def forecast(cfg: Config) -> Forecast:
    """What ``cfg`` costs a month at the providers, and which plan limits it exceeds.

    User lookups (balances, other mints' prices) come on top and depend on traffic; the
    rate limits bound them, so a limit above the plan's is reported as exceeding it.
    """
    up, st = cfg.upstream, cfg.state
    cost = {m: float(c) for m, c in up.method_costs.items()}
    gpa = cost.get("getProgramAccounts", 1.0)
    read = cost.get("getMultipleAccounts", 1.0)  # the jackpot read merges into getMultipleAccounts
    month = SECONDS_PER_MONTH
    # One connection a day (reconnects after provider restarts) and a small notification stream.
    pushed = month / st.participants_reconcile_interval * gpa + 30 * (WS_CONNECT_CREDITS + gpa + read)
    polling = month / st.participants_interval * gpa + month / st.polling_interval * read
    price_rps = min(1.0 / st.price_interval, cfg.price.max_requests_per_second)
    exceeded: list[str] = []
    plan = PROVIDER_PLANS.get(up.plan)
    if plan is not None and not up.parent:
        if up.max_requests_per_second > plan.rps:
            exceeded.append(f"upstream.max_requests_per_second {up.max_requests_per_second:g} > {plan.rps:g} req/s")
        for method, limit in plan.method_rps.items():
            ours = up.method_rate_limits.get(method, up.max_requests_per_second)
            if ours > limit:
                exceeded.append(f"{method} {ours:g}/s > {limit:g}/s (upstream.method_rate_limits)")
        if plan.credits_per_month:
            if pushed > plan.credits_per_month:
                exceeded.append(f"{pushed:,.0f} credits/month > {plan.credits_per_month:,.0f}")
            if up.credits_per_month > plan.credits_per_month:
                exceeded.append(
                    f"upstream.credits_per_month {up.credits_per_month:,.0f} > {plan.credits_per_month:,.0f}"
                )
    price_plan = JUPITER_KEY_RPS if cfg.price.api_key else JUPITER_KEYLESS_RPS
    if cfg.price.url.startswith("https://api.jup.ag/") and cfg.price.max_requests_per_second > price_plan:
        who = "a free Jupiter key" if cfg.price.api_key else "Jupiter without a key"
        exceeded.append(f"price.max_requests_per_second {cfg.price.max_requests_per_second:g} > {price_plan:g}/s ({who})")
    return Forecast(
        credits_pushed=pushed,
        credits_polling=polling,
        price_requests=price_rps * month,
        price_rps=price_rps,
        exceeded=exceeded,
        plan_label=plan.label if plan is not None else None,
        plan_credits=float(plan.credits_per_month) if plan is not None else 0.0,
    )


def cost_line(cfg: Config) -> str:
    """One line: the monthly cost of ``cfg`` and the plan limits it exceeds, if any."""
    if cfg.upstream.parent:
        return "cost: feed mode, no provider calls (the root's configuration carries the cost)"
    f = forecast(cfg)
    share = f" ({f.credits_pushed / f.plan_credits:.1%} of {f.plan_label})" if f.plan_credits else ""
    parts = [
        f"cost: ~{f.credits_pushed:,.0f} RPC credits/month with PubSub up{share}, "
        f"~{f.credits_polling:,.0f} while it is down",
        f"{f.price_requests:,.0f} price requests/month ({f.price_rps:g}/s)",
    ]
    if f.exceeded:
        parts.append(f"exceeds {f.plan_label or 'the plan'}: " + "; ".join(f.exceeded))
    elif f.plan_label:
        parts.append(f"within {f.plan_label}")
    return "; ".join(parts)


def method_costs(costs: Mapping[str, int], methods: Mapping[str, int]) -> float:
    """Credits of ``methods`` (method -> calls) at ``costs`` (default 1 a call)."""
    return float(sum(costs.get(m, 1) * n for m, n in methods.items()))
