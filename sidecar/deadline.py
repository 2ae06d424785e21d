"""Deadline: one timer per relayed request for the first-byte, stream-idle and total limits.

`asyncio.timeout()` around every chunk read would allocate and cancel a timer handle per chunk. Here a chunk
only stamps `last`; the single timer, when it fires, re-arms itself from `last` and expires only after a real
idle period. Expiry cancels the task the way `asyncio.Timeout` does (and undoes its own cancel request with
`uncancel`), so a client disconnect arriving at the same moment still wins: it stays a CancelledError.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class DeadlineExpired(Exception):
    """The relay ran out of time; `reason` is `first_byte`, `idle` or `total`."""

    def __init__(self, reason: str, seconds: float) -> None:
        super().__init__(f"{reason} timeout after {seconds:g}s")
        self.reason = reason
        self.seconds = seconds


class Deadline:
    __slots__ = (
        "_cancelling",
        "_first_byte",
        "_handle",
        "_idle",
        "_loop",
        "_start",
        "_task",
        "_total",
        "_when",
        "last",
        "reason",
    )

    def __init__(self, first_byte: float, idle: float, total: float = 0.0) -> None:
        self._first_byte = first_byte
        self._idle = idle
        self._total = total
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self.last: float | None = None  # loop time of the last upstream byte; None before the first
        self.reason = ""

    async def __aenter__(self) -> Deadline:
        self._loop = loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._start = loop.time()
        self._arm(self._start + self._first_byte)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self.reason:
            return
        # We cancelled the task: take that request back whatever happened since, then report the timeout.
        if self._task.uncancel() <= self._cancelling and et is asyncio.CancelledError:
            limit = {"first_byte": self._first_byte, "idle": self._idle, "total": self._total}[self.reason]
            raise DeadlineExpired(self.reason, limit) from None

    def first_byte(self) -> None:
        """The upstream answered: from now on the idle limit applies."""
        self.last = now = self._loop.time()
        if now + self._idle < self._when:
            self._arm(now + self._idle)

    def touch(self, now: float) -> None:
        self.last = now

    def _arm(self, when: float) -> None:
        if self._total:
            when = min(when, self._start + self._total)
        if self._handle is not None:
            self._handle.cancel()  # a pending handle would keep this whole request alive until it fires
        self._when = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        if self._total and now >= self._start + self._total:
            self.reason = "total"
        elif self.last is None:
            self.reason = "first_byte"
        elif now < self.last + self._idle:
            self._arm(self.last + self._idle)
            return
        else:
            self.reason = "idle"
        self._task.cancel()
