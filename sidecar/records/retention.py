"""Retention: request and audit rows older than `store.retention` are deleted, in small batches, off the hot path.

A background task sweeps every `store.retention_interval` seconds (the first sweep a few seconds after start).
Each batch deletes at most `BATCH` rows, the oldest first, and the task sleeps a moment between batches, so a
sweep never holds the store (or SQLite's one writer lock) for long and key lookups go on meanwhile. Replicas
sharing a PostgreSQL store each sweep; a delete is idempotent, so that only repeats a cheap query. A failed
sweep (the store is down) is logged and tried again at the next interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric

from sidecar.ops.series import counter
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.retention")

BATCH = 1000
PAUSE = 0.05  # between batches: the store serves others meanwhile
FIRST_SWEEP = 5.0
TABLES = ("request_log", "audit_records")


class Retention:
    def __init__(self, store: Store, keep_seconds: float, interval: float) -> None:
        self.store = store
        self.keep_seconds = keep_seconds
        self.interval = interval
        self.deleted = dict.fromkeys(TABLES, 0)
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # set by `close`: the sweep stops between batches

    async def start(self) -> None:
        if self.keep_seconds > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="retention")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._closing.set()  # not a cancel: one landing inside a store statement can be swallowed there
            await task

    async def _run(self) -> None:
        wait = min(FIRST_SWEEP, self.interval)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), wait)
                return
            try:
                await self.sweep()
            except StoreError as exc:
                log.warning("retention sweep failed; next one later", extra={"fields": {"error": str(exc)[:200]}})
            wait = self.interval

    async def sweep(self) -> int:
        """Delete what is past retention now; the number of rows deleted."""
        cutoff = time.time() - self.keep_seconds
        total = 0
        for table in TABLES:
            while True:
                n = await self.store.delete_older(table, cutoff, BATCH)
                self.deleted[table] += n
                total += n
                if n < BATCH or self._closing.is_set():  # closing: the rest waits for the next start
                    break
                await asyncio.sleep(PAUSE)
        if total:
            log.info("retention: old rows deleted", extra={"fields": {"rows": total, "cutoff": round(cutoff, 3)}})
        return total

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_retention_deleted_rows",
            "Rows deleted for being older than store.retention.",
            ("table",),
            {(t,): n for t, n in self.deleted.items()},
        )
