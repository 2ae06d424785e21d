"""Budgets: a key's token allowance per period: a calendar `day`, `week` (from Monday) or `month` in
`limits.timezone`, or a plain duration (`10m`, `1h`: windows aligned to the epoch, for tests and short trials).

Admission reserves the request's prompt estimate plus its output budget, as the minute buckets do, and refuses
a request whose reservation does not fit what is left (429 `insufficient_quota`, `retry-after` at the period's
end); `BudgetHold.settle` reconciles the reservation to what the request really used. What a key spent in the
period before this process counted it is read from the store once per key and period (its request rows); from
then on this process counts. Without the store that first read cannot be made: the request gets 503 (a budget
is billing: it fails closed).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sidecar.config import duration
from sidecar.errors import InsufficientQuota, StoreUnavailable
from sidecar.store.base import StoreError

CALENDAR = ("day", "week", "month")


def valid_period(period: str) -> bool:
    return period in CALENDAR or (duration(period) or 0) >= 1


def period_bounds(period: str, now: float, tz: ZoneInfo) -> tuple[float, float]:
    """(start, end) in epoch seconds of the period `now` falls in."""
    if period not in CALENDAR:
        length = duration(period) or 0.0
        start = math.floor(now / length) * length
        return start, start + length
    today = datetime.fromtimestamp(now, tz).date()
    if period == "day":
        first, following = today, today + timedelta(days=1)
    elif period == "week":
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    return _midnight(first, tz), _midnight(following, tz)


def _midnight(day: date, tz: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


@dataclass(slots=True)
class BudgetState:
    """One key's budget in one period, as this process sees it."""

    budget: int
    start: float
    end: float
    spent: int = 0  # tokens used in the period: read from the store once, then counted here
    reserved: int = 0  # tokens held by this key's requests in flight


@dataclass(slots=True)
class BudgetHold:
    state: BudgetState
    reserved: int
    settled: bool = False

    def settle(self, used: int) -> None:
        """Replace the reservation by what the request used (once; later calls are no-ops)."""
        if self.settled:
            return
        self.settled = True
        self.state.reserved -= self.reserved
        self.state.spent += used
        self.reserved = 0


class Budgets:
    def __init__(
        self,
        timezone: str,
        spent_since: Callable[[str, float], Awaitable[int]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tz = ZoneInfo(timezone)
        self.spent_since = spent_since
        self.clock = clock
        self._states: dict[tuple[str, str, int, float], BudgetState] = {}
        self._loading: dict[tuple[str, str, int, float], asyncio.Future[BudgetState]] = {}

    async def reserve(self, key_id: str, budget: int, period: str, need: int) -> BudgetHold:
        """Hold `need` tokens of the key's budget for a request, or raise InsufficientQuota."""
        now = self.clock()
        state = await self._state(key_id, budget, period, now)
        left = state.budget - state.spent - state.reserved
        if need > left:
            wait = max(1, math.ceil(state.end - now))
            raise InsufficientQuota(
                f"This key's token budget for the {_name(period)} is used up: {max(0, left)} of {budget} tokens "
                f"left, this request reserves {need}. It resets at {_iso(state.end)}.",
                headers={"retry-after": str(wait)},
            )
        state.reserved += need
        return BudgetHold(state, need)

    async def remaining(self, key_id: str, budget: int, period: str) -> tuple[int, float]:
        """(tokens left this period, when the period ends) as this process counts them."""
        state = await self._state(key_id, budget, period, self.clock())
        return max(0, state.budget - state.spent - state.reserved), state.end

    async def _state(self, key_id: str, budget: int, period: str, now: float) -> BudgetState:
        start, end = period_bounds(period, now, self.tz)
        key = (key_id, period, budget, start)
        state = self._states.get(key)
        if state is not None:
            return state
        loading = self._loading.get(key)
        if loading is None:  # one store read per key and period, however many requests arrive meanwhile
            loading = self._loading[key] = asyncio.ensure_future(self._load(key_id, budget, start, end))
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        state = await asyncio.shield(loading)
        self._states.setdefault(key, state)
        self._prune(now)
        return self._states[key]

    async def _load(self, key_id: str, budget: int, start: float, end: float) -> BudgetState:
        try:
            spent = await self.spent_since(key_id, start)
        except StoreError:
            raise StoreUnavailable("The key's budget cannot be checked: the store is unavailable.") from None
        return BudgetState(budget, start, end, spent)

    def _prune(self, now: float) -> None:
        """Periods that ended, with nothing in flight, are forgotten."""
        for key in [k for k, s in self._states.items() if s.end <= now and s.reserved == 0]:
            del self._states[key]


def _name(period: str) -> str:
    return period if period in CALENDAR else f"{period} period"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, ZoneInfo("UTC")).strftime("%Y-%m-%dT%H:%M:%SZ")


async def budget_fields(
    key_id: str,
    budget: int | None,
    period: str | None,
    remaining: Callable[[str, int, str], Awaitable[tuple[int, float]]],
) -> dict[str, object]:
    """`budget_remaining` and `budget_resets_at` (epoch seconds) for a key with a budget; nothing without."""
    if budget is None or not period:
        return {}
    left, end = await remaining(key_id, budget, period)
    return {"budget_remaining": left, "budget_resets_at": end}


def from_store(
    spent_since: Callable[[str, float], Awaitable[int]], timezone: str, clock: Callable[[], float] = time.time
) -> Callable[[str, int, str], Awaitable[tuple[int, float]]]:
    """What is left as the store's rows say (the CLI: no process counting in flight)."""
    tz = ZoneInfo(timezone)

    async def remaining(key_id: str, budget: int, period: str) -> tuple[int, float]:
        start, end = period_bounds(period, clock(), tz)
        return max(0, budget - await spent_since(key_id, start)), end

    return remaining
