"""RejectSampler: what an unauthenticated reject costs, bounded per source.

Requests that end before any key is verified (401: no key, a malformed, unknown, revoked or expired key; 404
and 405: a path or method the proxy does not serve; 503: the key store unreachable for an unknown key) come
from anyone, so a flood of them must not grow the disk. Per client address the first `per_minute` of them a
minute (a token bucket) get their usual `request_log` row, journal entry and log line, and all sources together
at most `GLOBAL_FACTOR` times that (so many addresses, e.g. IPv6, cannot multiply it); the rest are only
counted (`sidecar_unauthenticated_rejects_total{recorded}`), and once a minute, while any are being skipped,
one warning line says how many and from how many sources. At most `MAX_SOURCES` addresses are tracked; past
that the table starts over (the global bucket still holds). Requests with a valid key are always recorded:
they are what usage is billed from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from sidecar.ops.series import counter

log = logging.getLogger("sidecar.rejects")

MAX_SOURCES = 10_000
SUMMARY_EVERY = 60.0
GLOBAL_FACTOR = 5


class RejectSampler:
    def __init__(
        self,
        per_minute: int,
        summary: str = "unauthenticated requests rejected without a row (over server.reject_rows_per_minute)",
    ) -> None:
        self.message = summary
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._sources: dict[str, tuple[float, float]] = {}  # address -> (tokens, stamp)
        self._all = (self.capacity * GLOBAL_FACTOR, time.monotonic())
        self.recorded = 0
        self.skipped = 0
        self._skipped_since = 0
        self._skipping_from: set[str] = set()
        self._summary_at = time.monotonic() + SUMMARY_EVERY

    def keep(self, source: str | None) -> bool:
        """Whether this unauthenticated reject from `source` gets a row and a log line."""
        now = time.monotonic()
        address = source or "unknown"
        tokens, stamp = self._sources.get(address, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - stamp) * self.rate)
        shared = min(self.capacity * GLOBAL_FACTOR, self._all[0] + (now - self._all[1]) * self.rate * GLOBAL_FACTOR)
        if tokens >= 1.0 and shared >= 1.0:
            self._remember(address, tokens - 1.0, now)
            self._all = (shared - 1.0, now)
            self.recorded += 1
            return True
        self._all = (shared, now)
        self._remember(address, tokens, now)
        self.skipped += 1
        self._skipped_since += 1
        if len(self._skipping_from) < MAX_SOURCES:
            self._skipping_from.add(address)
        if now >= self._summary_at:
            self.summary(now)
        return False

    def _remember(self, address: str, tokens: float, now: float) -> None:
        if len(self._sources) >= MAX_SOURCES and address not in self._sources:
            self._sources.clear()
        self._sources[address] = (tokens, now)

    def summary(self, now: float | None = None) -> None:
        """One line for the rejects skipped since the last one (also at shutdown)."""
        self._summary_at = (now or time.monotonic()) + SUMMARY_EVERY
        if self._skipped_since:
            log.warning(
                self.message,
                extra={"fields": {"requests": self._skipped_since, "sources": len(self._skipping_from)}},
            )
        self._skipped_since = 0
        self._skipping_from.clear()

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_unauthenticated_rejects",
            "Requests that ended before a key was verified, by whether they got a row.",
            ("recorded",),
            {("true",): self.recorded, ("false",): self.skipped},
        )
