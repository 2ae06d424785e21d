"""Budgets: a key's token allowance per period: a calendar `day`, `week` (from Monday) or `month` in
`limits.timezone`, or a plain duration (`10m`, `1h`: windows aligned to the epoch, for tests and short trials).

The store holds each key's balance for the period (`limit_balances`), shared by every replica: it starts at the
budget less what the key's stored requests used in the period. A replica borrows an allowance from it (at least
what a request needs, else an eighth of what is left) and admits requests from that allowance without a store
round trip, topping it up in the background when half is spent (one borrow in flight per key); what a request
did not use goes back to the allowance, and an idle key's allowance (or one at drain) goes back to the balance.
Admission reserves the request's prompt estimate plus its output budget, as the minute buckets do, and refuses
a request whose reservation does not fit (429 `insufficient_quota`, `retry-after` at the period's end). With the
store unreachable, an allowance in hand is still spent; beyond it: 503 (a budget is billing: it fails closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial
from zoneinfo import ZoneInfo

from sidecar.config import duration
from sidecar.errors import InsufficientQuota, StoreUnavailable
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.budgets")

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


FRACTION = 0.125  # a borrow takes an eighth of what is left (at least what the request needs)
IDLE = 5.0  # seconds without a request before a key's allowance goes back to the shared balance
EMPTY_RECHECK = 1.0  # after the balance said "used up", ask it again at most this often


@dataclass(slots=True)
class BudgetState:
    """One key's budget in one period, as this process holds it: an allowance borrowed from the store's
    balance, spent by admissions and topped up in the background before it runs out."""

    budget: int
    start: float
    end: float
    allowance: float = 0.0  # borrowed, not yet reserved (negative: used beyond what was reserved)
    reserved: int = 0  # tokens held by this key's requests in flight
    low: float = 0.0  # below this the allowance is topped up in the background
    last_used: float = 0.0
    empty_until: float = 0.0
    borrowing: asyncio.Future[None] | None = None

    @property
    def bucket(self) -> str:
        return f"{self.start:.0f}:{self.budget}"


@dataclass(slots=True)
class BudgetHold:
    state: BudgetState
    reserved: int
    settled: bool = False

    def settle(self, used: int) -> None:
        """Replace the reservation by what the request used (once; later calls are no-ops): the difference goes
        back to (or, when it used more, comes out of) the allowance, to reach the store with the next return."""
        if self.settled:
            return
        self.settled = True
        self.state.reserved -= self.reserved
        self.state.allowance += self.reserved - used
        self.reserved = 0


class Budgets:
    """Admission against a key's budget through allowances borrowed from the store: one statement per
    borrow, never one per request; the store's balance is the one truth all replicas share."""

    def __init__(self, timezone: str, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.tz = ZoneInfo(timezone)
        self.store = store
        self.clock = clock
        self._states: dict[tuple[str, str, int, float], BudgetState] = {}
        self._keys: dict[tuple[str, str, int, float], str] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._refills: set[asyncio.Future[None]] = set()
        self.borrows = 0  # statements sent to borrow (a figure for the benchmark and the tests)

    async def reserve(self, key_id: str, budget: int, period: str, need: int) -> BudgetHold:
        """Hold `need` tokens of the key's budget for a request, or raise InsufficientQuota."""
        now = self.clock()
        state = self._state(key_id, budget, period, now)
        state.last_used = now
        if state.allowance < need:
            if now >= state.empty_until:
                await self._borrow(key_id, state, need - state.allowance)
            if state.allowance < need:
                state.empty_until = now + EMPTY_RECHECK
                wait = max(1, math.ceil(state.end - now))
                raise InsufficientQuota(
                    f"This key's token budget for the {_name(period)} is used up ({budget} tokens; this request "
                    f"reserves {need}). It resets at {_iso(state.end)}.",
                    headers={"retry-after": str(wait)},
                )
        state.allowance -= need
        state.reserved += need
        if state.allowance < state.low and state.borrowing is None:  # top up before it runs out
            task = asyncio.ensure_future(self._borrow_quietly(key_id, state))
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)
        return BudgetHold(state, need)

    async def remaining(self, key_id: str, budget: int, period: str) -> tuple[int, float]:
        """(tokens left this period, when it ends), as the key's stored requests say."""
        start, end = period_bounds(period, self.clock(), self.tz)
        spent = await self.store.tokens_since(key_id, start)
        return max(0, budget - spent), end

    def _state(self, key_id: str, budget: int, period: str, now: float) -> BudgetState:
        start, end = period_bounds(period, now, self.tz)
        key = (key_id, period, budget, start)
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = BudgetState(budget, start, end)
            self._keys[key] = key_id
        return state

    async def _borrow(self, key_id: str, state: BudgetState, need: float) -> None:
        """One borrow in flight per key and period: a request that finds one running waits for it."""
        if state.borrowing is not None:
            await asyncio.shield(state.borrowing)
            if state.allowance >= need or self.clock() < state.empty_until:
                return
        loop = asyncio.get_running_loop()
        state.borrowing = done = loop.create_future()
        try:
            self.borrows += 1
            granted, _ = await self.store.borrow_budget(
                key_id, state.bucket, state.budget, state.start, max(need, 0.0), FRACTION
            )
            state.allowance += granted
            state.low = granted / 2
        except StoreError:
            raise StoreUnavailable("The key's budget cannot be checked: the store is unavailable.") from None
        finally:
            state.borrowing = None
            done.set_result(None)

    async def _borrow_quietly(self, key_id: str, state: BudgetState) -> None:
        with contextlib.suppress(StoreUnavailable):  # a request that needs it will ask again, and say so
            await self._borrow(key_id, state, 0.0)

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """At drain: every allowance goes back, so other replicas can use it."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._refills:
            await asyncio.wait(self._refills)
        await self._give_back(lambda state: True)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(IDLE / 2)
            now = self.clock()
            try:
                await self._give_back(partial(_idle, now=now))
            except StoreError as exc:
                log.warning("budget allowances not returned yet", extra={"fields": {"error": str(exc)[:200]}})

    async def _give_back(self, due: Callable[[BudgetState], bool]) -> None:
        """Return the allowances of idle keys and ended periods (those with nothing in flight)."""
        for key, state in list(self._states.items()):
            if state.reserved or state.borrowing is not None or not due(state):
                continue
            if state.allowance:
                await self.store.give_back(self._keys[key], state.bucket, state.allowance)
            self._states.pop(key, None)
            self._keys.pop(key, None)


def _idle(state: BudgetState, now: float) -> bool:
    return state.end <= now or now - state.last_used >= IDLE


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
