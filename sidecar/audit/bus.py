"""Audit sinks and the bus that feeds them: a bounded queue and one worker per sink.

A request never waits for a sink: `AuditBus.emit()` offers the record to each sink's queue and, when a queue
is full (the sink is slow, failing or stuck), drops it there and counts the drop. File sinks write from a
daemon thread of their own, so even a write that blocks forever (a full pipe, a hung disk) blocks only that
sink; shutdown waits for them up to a deadline and then leaves them behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

from sidecar.ops.series import counter

log = logging.getLogger("sidecar.audit")


class Sink(Protocol):
    name: str

    def offer(self, line: bytes, record: dict[str, Any]) -> bool:
        """Queue one record without waiting; False when the sink's queue is full."""
        ...

    async def start(self) -> None: ...
    async def close(self, timeout: float) -> None: ...
    def results(self) -> dict[str, int]: ...


class AuditBus:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks
        self.dropped: dict[str, int] = {"queue_full": 0}

    def emit(self, record: dict[str, Any], line: bytes) -> None:
        """Offer one record (and its JSON line) to every sink; never waits."""
        for sink in self.sinks:
            if not sink.offer(line, record):
                self.dropped["queue_full"] += 1

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()

    async def close(self, timeout: float) -> None:
        for sink in self.sinks:
            await sink.close(timeout)

    def collect(self) -> Iterator[Metric]:
        results: dict[tuple[str, ...], float] = {}
        for sink in self.sinks:
            for result, n in sink.results().items():
                results[(sink.name, result)] = n
        yield counter("sidecar_audit_records", "Audit records by sink and result.", ("sink", "result"), results)
        yield counter(
            "sidecar_audit_dropped",
            "Audit records dropped, by reason.",
            ("reason",),
            {(k,): v for k, v in self.dropped.items()},
        )
