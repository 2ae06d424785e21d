"""Budgets: a key's token allowance per period: a calendar `day`, `week` (from Monday) or `month` in
`limits.timezone`, or a plain duration (`10m`, `1h`: windows aligned to the epoch, for tests and short trials).

The store holds each key's balance for the period (`limit_balances`), shared by every replica: it starts at the
budget less what the key's stored requests used in the period. A replica borrows an allowance from it (at least
what a request needs, else an eighth of what is left) and admits requests from that allowance without a store
round trip, topping it up in the background when half is spent (one borrow in flight per key); what a request
did not use goes back to the allowance, and an idle key's allowance (or one at drain) goes back to the balance;
what a killed replica held goes back when its lease expires (`sidecar.limits.borrowing`).
Admission reserves the request's prompt estimate plus its output budget, as the minute buckets do, and refuses
a request whose reservation does not fit (429 `insufficient_quota`, `retry-after` at the period's end). With the
store unreachable, an allowance in hand is still spent; beyond it: 503 (a budget is billing: it fails closed).
What is left (`remaining`, the figure the reports show) is kept by the store beside the balance, never summed
over the rows per call, and read on the report connection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sidecar.errors import InsufficientQuota
from sidecar.limits.borrowing import FRACTION, LEASE, Balance, Borrower, Hold
from sidecar.limits.periods import CALENDAR, period_bounds
from sidecar.ops.metrics import MAX_KEYS

Remaining = Callable[[str, int, str], Awaitable[tuple[int, float]]]  # (key, budget, period) -> (left, resets at)
# [(key, budget, period)] -> {key: (left, resets at)} for the keys whose balance for this period exists
LeftMany = Callable[[Sequence[tuple[str, int, str]]], Awaitable[dict[str, tuple[float, float]]]]


class Budgets:
    """Admission against a key's budget through the allowances borrowed: the store's balance for the period is the
    one truth all replicas share."""

    def __init__(self, timezone: str, borrower: Borrower, clock: Callable[[], float] = time.time) -> None:
        self.tz = ZoneInfo(timezone)
        self.borrower = borrower
        self.store = borrower.store
        self.clock = clock
        # Keys that reserved against their budget (MAX_KEYS at most): key -> (budget, period, when last), the keys
        # whose figures /metrics shows (`sidecar.limits.gauges`).
        self.watched: dict[str, tuple[int, str, float]] = {}
        self.new_watched = False  # a key was added since the figures were read: read them at the next scrape

    async def reserve(self, key_id: str, budget: int, period: str, need: int) -> Hold:
        """Hold `need` tokens of the key's budget for a request, or raise InsufficientQuota."""
        now = self.clock()
        if key_id in self.watched or len(self.watched) < MAX_KEYS:
            self.new_watched = self.new_watched or key_id not in self.watched
            self.watched[key_id] = (budget, period, now)
        start, end = period_bounds(period, now, self.tz)
        bucket = _bucket(start, budget)

        def borrow(want: float) -> Awaitable[tuple[float, float]]:
            return self.store.borrow_budget(key_id, bucket, budget, (start, end), want, FRACTION, LEASE)

        until = self.borrower.clock() + (end - now)  # the borrower's clock: the allowance goes back at the period's end
        hold = await self.borrower.take(Balance(key_id, "budget", bucket), need, borrow, until)
        if hold is None:
            raise InsufficientQuota(
                f"This key's token budget for the {_name(period)} is used up ({budget} tokens; this request "
                f"reserves {need}). It resets at {_iso(end)}.",
                headers={"retry-after": str(max(1, math.ceil(end - now)))},
            )
        return hold

    async def remaining(self, key_id: str, budget: int, period: str) -> tuple[int, float]:
        """(tokens left this period, when it ends): the budget less what the key's stored requests used, as the
        store keeps it beside the balance (on the report connection: never in front of key lookups)."""
        start, end = period_bounds(period, self.clock(), self.tz)
        left = await self.store.budget_left(key_id, _bucket(start, budget), budget, (start, end))
        return max(0, round(left)), end

    async def left_many(self, keys: Sequence[tuple[str, int, str]]) -> dict[str, tuple[float, float]]:
        """What `remaining` says for many keys in one report query ((tokens left, unrounded: below 0 when a key
        used more than it reserved; when the period ends)), for those whose balance for this period exists: a
        key no request has borrowed for since the period began (or its budget changed) is left out."""
        now = self.clock()
        wanted: dict[str, tuple[str, float]] = {}
        for key_id, budget, period in keys:
            start, end = period_bounds(period, now, self.tz)
            wanted[key_id] = (_bucket(start, budget), end)
        levels = await self.store.budget_levels([(key, bucket) for key, (bucket, _) in wanted.items()])
        return {key: (levels[(key, bucket)], end) for key, (bucket, end) in wanted.items() if (key, bucket) in levels}

    def period_start(self, period: str) -> float:
        return period_bounds(period, self.clock(), self.tz)[0]


def _bucket(start: float, budget: int) -> str:
    return f"{start:.0f}:{budget}"  # a new period, or a changed budget, is a new balance


def _name(period: str) -> str:
    return period if period in CALENDAR else f"{period} period"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")


async def budget_fields(
    key_id: str,
    budget: int | None,
    period: str | None,
    remaining: Remaining,
) -> dict[str, object]:
    """`budget_remaining` and `budget_resets_at` (epoch seconds) for a key with a budget; nothing without."""
    if budget is None or not period:
        return {}
    left, end = await remaining(key_id, budget, period)
    return {"budget_remaining": left, "budget_resets_at": end}


async def listed_budgets(keys: list[dict[str, Any]], left_many: LeftMany) -> None:
    """`budget_remaining` and `budget_used_ratio` (what the stored rows used over the budget) into each listed key
    that has a budget and a balance this period: one report query for the whole list."""
    budgeted = [k for k in keys if k.get("budget_tokens") and k.get("budget_period") and not k.get("revoked_at")]
    figures = await left_many([(k["id"], k["budget_tokens"], k["budget_period"]) for k in budgeted])
    for key in budgeted:
        if (figure := figures.get(key["id"])) is not None:
            key["budget_remaining"] = max(0, round(figure[0]))
            key["budget_used_ratio"] = round((key["budget_tokens"] - figure[0]) / key["budget_tokens"], 4)


def from_store(
    spent_since: Callable[[str, float], Awaitable[int]], timezone: str, clock: Callable[[], float] = time.time
) -> Remaining:
    """What is left as the store's rows say (the CLI: no process counting in flight)."""
    tz = ZoneInfo(timezone)

    async def remaining(key_id: str, budget: int, period: str) -> tuple[int, float]:
        start, end = period_bounds(period, clock(), tz)
        return max(0, budget - await spent_since(key_id, start)), end

    return remaining
