"""Deadlines for relayed requests: first byte, stream idle and total limits, checked by one shared ticker.

A timer per request is not free: on uvloop each `call_at` allocates a libuv timer handle and its cancel
closes it again, about 10 µs a request, more than the rest of a small request's bookkeeping. So every
relay registers its `Deadline` with the app's `Ticker`, which wakes every `tick` seconds while anything is
registered and expires what is overdue; a chunk only stamps `last`. Limits are therefore enforced within
one tick (0.1 s), which is fine for limits measured in seconds to minutes.

Expiry cancels the task the way `asyncio.Timeout` does (and takes its own cancel request back with
`uncancel`), so a client disconnect arriving at the same moment still wins: it stays a CancelledError.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Literal

TICK = 0.1
Limit = Literal["first_byte", "idle", "total"]


class DeadlineExpired(Exception):
    """The relay ran out of time; `reason` is `first_byte`, `idle` or `total`."""

    def __init__(self, reason: Limit, seconds: float) -> None:
        super().__init__(f"{reason} timeout after {seconds:g}s")
        self.reason = reason
        self.seconds = seconds


class Ticker:
    """Wakes every `tick` seconds while deadlines are registered, and expires the overdue ones."""

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self.active: set[Deadline] = set()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, deadline: Deadline, loop: asyncio.AbstractEventLoop) -> None:
        self.active.add(deadline)
        if self._handle is None:
            self._handle = loop.call_later(self.tick, self._run, loop)

    def discard(self, deadline: Deadline) -> None:
        self.active.discard(deadline)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time()
        for deadline in [d for d in self.active if d.due(now)]:
            self.active.discard(deadline)
            deadline.expire(now)
        if self.active:
            self._handle = loop.call_later(self.tick, self._run, loop)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Deadline:
    __slots__ = ("_cancelling", "_first_byte", "_idle", "_start", "_task", "_ticker", "_total", "last", "reason")

    def __init__(self, ticker: Ticker, first_byte: float, idle: float, total: float = 0.0) -> None:
        self._ticker = ticker
        self._first_byte = first_byte
        self._idle = idle
        self._total = total
        self.last: float | None = None  # loop time of the last upstream byte; None before the first
        self.reason: Limit | None = None

    async def __aenter__(self) -> Deadline:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._start = loop.time()
        self._ticker.add(self, loop)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ticker.discard(self)
        if self.reason is None:
            return
        # We cancelled the task: take that request back whatever happened since, then report the timeout.
        if self._task.uncancel() <= self._cancelling and et is asyncio.CancelledError:
            limit = {"first_byte": self._first_byte, "idle": self._idle, "total": self._total}[self.reason]
            raise DeadlineExpired(self.reason, limit) from None

    def touch(self, now: float) -> None:
        """Bytes from the upstream: from the first on, the idle limit applies (before it, the first-byte one)."""
        self.last = now

    def due(self, now: float) -> bool:
        if self._total and now >= self._start + self._total:
            return True
        if self.last is None:
            return now >= self._start + self._first_byte
        return now >= self.last + self._idle

    def expire(self, now: float) -> None:
        if self._total and now >= self._start + self._total:
            self.reason = "total"
        else:
            self.reason = "first_byte" if self.last is None else "idle"
        self._task.cancel()
