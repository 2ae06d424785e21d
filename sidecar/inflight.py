"""InFlight: the requests being handled, for the drain (wait for them, then cancel what is left) and metrics."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from sidecar.errors import ShuttingDown

log = logging.getLogger("sidecar.inflight")


class InFlight:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    def track(self) -> _Tracked:
        """`async with in_flight.track():` around a request's handling."""
        return _Tracked(self)

    def cancel_all(self) -> int:
        """Shutdown: cancel every request still running; each ends with a `shutdown` record."""
        self.shutting_down = True
        for task in self.tasks:
            task.cancel()
        return len(self.tasks)

    def shutdown_cancel(self, client_gone: bool) -> ShuttingDown | None:
        """In a request's `except CancelledError`: our own shutdown cancel, with the client still there, is taken
        back (uncancelled) and becomes the error the request ends with; None for any other cancel, which must
        propagate."""
        if not self.shutting_down or client_gone:
            return None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return ShuttingDown("The server is shutting down; retry the request.")

    async def wait_idle(self, timeout: float) -> None:
        if not self.tasks:
            return
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("requests still running after shutdown", extra={"fields": {"requests": len(self.tasks)}})

    def _left(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if self._idle is not None and not self.tasks:
            self._idle.set()


class _Tracked:
    __slots__ = ("_in_flight", "_task")

    def __init__(self, in_flight: InFlight) -> None:
        self._in_flight = in_flight
        task = asyncio.current_task()
        assert task is not None
        self._task = task

    async def __aenter__(self) -> None:
        self._in_flight.tasks.add(self._task)

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._in_flight._left(self._task)
