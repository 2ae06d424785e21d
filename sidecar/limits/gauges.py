"""The budget figures `/metrics` shows per key: `sidecar_key_budget_tokens`, `..._remaining_tokens` and
`..._used_ratio` (what the key's stored requests used this period over its budget), so an alert can say a budget
is about to run out before a client hears it.

The keys are those that reserved against their budget in this process (`Budgets.watched`: MAX_KEYS at most, the
first seen; a key idle for a whole period is dropped at the next refresh). The figures are the store's kept
balances (`budget_left`'s, for all those keys in one report query), read when a scrape finds them older than
`limits.budget_metrics_refresh` seconds (or a key was added since): a scrape never costs a query per key, and
without scrapes nothing is read. How stale: that interval, plus the writer's flush (a request counts once its
row is stored); a scrape waits at most `WAIT` for a refresh, a slower one (or the store unreachable) leaves the
last figures in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from sidecar.limits.budgets import Budgets
from sidecar.ops.series import gauge
from sidecar.store.base import StoreError

WAIT = 1.0  # seconds a scrape waits for a refresh before it answers with the figures it has


class BudgetGauges:
    def __init__(self, budgets: Budgets, every: float) -> None:
        self.budgets = budgets
        self.every = every
        self.figures: dict[str, tuple[int, float]] = {}  # key -> (its budget, tokens left) at the last refresh
        self._at = -float("inf")  # monotonic time of the last refresh (tried)
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Before a scrape: the figures read again when they are older than `every` (one refresh at a time)."""
        if self._task is None and (self.budgets.new_watched or time.monotonic() - self._at >= self.every):
            self._at, self.budgets.new_watched = time.monotonic(), False
            self._task = asyncio.ensure_future(self._refresh())
        if self._task is not None:
            await asyncio.wait((self._task,), timeout=WAIT)

    async def _refresh(self) -> None:
        watched = self.budgets.watched
        try:
            for key_id, (_, period, seen) in list(watched.items()):
                if seen < self.budgets.period_start(period):  # no request all this period: its slot goes
                    del watched[key_id]
            keys = [(key_id, budget, period) for key_id, (budget, period, _) in watched.items()]
            with contextlib.suppress(StoreError):  # unreachable or slow: the last figures stay (and say so by age)
                left = await self.budgets.left_many(keys)
                self.figures = {key: (budget, left[key][0]) for key, budget, _ in keys if key in left}
        finally:
            self._task = None

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.wait((self._task,))

    def collect(self) -> Iterator[Metric]:
        used: dict[tuple[str, ...], float] = {}
        budgets: dict[tuple[str, ...], float] = {}
        left: dict[tuple[str, ...], float] = {}
        for key_id, (budget, remaining) in self.figures.items():
            if key_id in self.budgets.watched and budget > 0:
                used[(key_id,)] = (budget - remaining) / budget
                budgets[(key_id,)] = budget
                left[(key_id,)] = max(0.0, remaining)
        what = "limits.budget_metrics_refresh"
        yield gauge(
            "sidecar_key_budget_used_ratio",
            f"Share of the key's token budget its stored requests used this period (above 1: used beyond it); read "
            f"from the store at most every {what} seconds.",
            ("key_id",),
            used,
        )
        yield gauge("sidecar_key_budget_tokens", "The key's token budget for its period.", ("key_id",), budgets)
        yield gauge(
            "sidecar_key_budget_remaining_tokens",
            f"Tokens left of the key's budget this period, as the store keeps it (at most {what} seconds old).",
            ("key_id",),
            left,
        )
