"""Deadline: one timer per relayed request for the first-byte, stream-idle and total limits.

`asyncio.timeout()` around every chunk read would allocate and cancel a timer handle per chunk. Here a chunk
only stamps `last`; the single timer, when it fires, re-arms itself from `last` and expires only after a real
idle period. Expiry goes through `asyncio.Timeout`, so cancellation is delivered and converted the standard
way, and a client disconnect arriving at the same moment still wins (it stays a CancelledError).
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
    __slots__ = ("_first_byte", "_idle", "_total", "_loop", "_timeout", "_handle", "_start", "last", "reason")

    def __init__(self, first_byte: float, idle: float, total: float = 0.0) -> None:
        self._first_byte = first_byte
        self._idle = idle
        self._total = total
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._start = 0.0
        self.last: float | None = None  # loop time of the last upstream byte; None before the first
        self.reason = ""

    async def __aenter__(self) -> Deadline:
        self._loop = loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._start = loop.time()
        self._arm(self._start + self._first_byte)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._handle is not None:
            self._handle.cancel()
        assert self._timeout is not None
        try:
            await self._timeout.__aexit__(et, exc, tb)
        except TimeoutError:
            if not self._timeout.expired():
                raise
            limit = {"first_byte": self._first_byte, "idle": self._idle, "total": self._total}[self.reason]
            raise DeadlineExpired(self.reason, limit) from None
        return None

    def first_byte(self) -> None:
        """The upstream answered: from now on the idle limit applies."""
        assert self._loop is not None
        self.last = now = self._loop.time()
        self._arm(now + self._idle)

    def touch(self, now: float) -> None:
        self.last = now

    def _arm(self, when: float) -> None:
        if self._total:
            when = min(when, self._start + self._total)
        assert self._loop is not None
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None and self._timeout is not None
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
        self._timeout.reschedule(now)
