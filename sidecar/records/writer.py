"""BatchWriter: request records into the store in batches, off the hot path, losing none.

`put(row)` is synchronous, never awaits and never raises. With the spool on it appends the row to the current
journal segment (`sidecar.records.spool`: one `write(2)` into the page cache, so a killed process loses nothing) and
queues it. A flush cycle rotates the segment, inserts the queued rows in batches of `max_rows` with
`ON CONFLICT (request_id) DO NOTHING`, and deletes the old segment once they are all in.

While the store is unreachable the segment is kept: it *is* the spool. Rows then go to the current segment
only (one segment appended to, closed at `spool_segment_bytes`, 16 MiB), the store is probed with a backoff
(at most 2 s apart), and the spool is replayed, oldest first and idempotently, once it answers (also at the
next start). A batch the store rejects for its data is retried row by row, each failing row sanitised once
and, if still refused, written to a dead-letter file, so one poison row cannot lose the others.

A journal that cannot take a row (disk full, I/O error, read-only volume, or `spool_max_bytes` reached) never
changes a response: the row is held in memory instead, up to `queue_size` rows, and goes to the store as
usual; only beyond that are rows dropped, counted and logged. Without the spool every row takes that path.
On close the queue and spool are drained within `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from sidecar.config import WriterCfg
from sidecar.ops.series import counter, gauge
from sidecar.records.rows import Line, Row, dump, sanitised_line
from sidecar.records.spool import Segment, Spool
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.writer")
_MAX_BACKOFF = 2.0  # a store that is down is probed at most this far apart


class BatchWriter:
    def __init__(
        self,
        store: Store,
        cfg: WriterCfg,
        spool_dir: str,
        name: str = "requests",
        insert: Callable[[Sequence[Line]], Awaitable[int]] | None = None,
    ) -> None:
        self.store = store
        self._insert_rows = insert or store.insert_requests
        self.cfg = cfg
        self.name = name
        self.dir = Path(spool_dir)
        self.spool = Spool(spool_dir, name, cfg.spool_max_bytes) if cfg.spool else None
        self._queue: deque[Line] = deque()  # journaled rows (in the current segment) on their way to the store
        self._held: deque[Line] = deque()  # rows in no journal (failing, full or off): memory only, bounded
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down = False  # the store refused the last write: journaled rows stay in the spool only
        self._outage = False  # between the first failed write and the end of the replay (for the log lines)
        self._unqueued = False  # the current segment holds rows that are not in `_queue`
        self._probe_at = 0.0
        self._backoff = 0.0
        self._dropping = False
        self.written = self.spooled = self.dropped = self.dead = self.store_errors = self.failed_cycles = 0
        self.unjournaled = 0
        self.flush_seconds = 0.0
        self.flushes = 0
        self.cycles = 0  # loop turns of the writing task, flushing or not

    # --- hot path ---------------------------------------------------------------------------------------
    def put(self, row: Row) -> Line:
        """Queue one row; never awaits, never raises, never blocks on the store. Returns the row's JSON line."""
        line = dump(row)
        spool = self.spool
        if spool is not None and spool.append(line + b"\n"):
            if self._down:
                self.spooled += 1  # on disk only: replayed when the store answers again
            else:
                self._queue.append(line)
            if spool.current is not None and spool.current.size >= self.cfg.spool_segment_bytes:
                # Segments of bounded size, replayed one by one (rows also queued are only inserted twice,
                # which the store ignores).
                spool.rotate(keep=True)
        else:
            if spool is not None:
                self.unjournaled += 1
            if len(self._held) >= self.cfg.queue_size:
                self._drop(1)
                return line
            self._held.append(line)
        if len(self._queue) + len(self._held) >= self.cfg.max_rows:
            self._wake.set()
        return line

    def _drop(self, n: int) -> None:
        self.dropped += n
        if not self._dropping:
            self._dropping = True
            log.error(
                "rows dropped: neither the journal nor the store can take them and writer.queue_size is reached",
                extra={"fields": {"table": self.name, "held": len(self._held)}},
            )

    def _hold(self, lines: list[Line]) -> None:
        """Rows in no journal that the store did not take: back in memory, within `queue_size`."""
        room = max(0, self.cfg.queue_size - len(self._held))
        self._held.extendleft(reversed(lines[:room]))
        if len(lines) > room:
            self._drop(len(lines) - room)

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.spool is not None:
            self.spool.open()
            await self._recover()  # what an earlier run left
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"writer-{self.name}")

    @property
    def alive(self) -> bool:
        """The writing task is running (it only ends on close)."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Drain: write what is queued (and spooled) within the drain timeout, then stop."""
        self._closing = True
        self._probe_at = 0.0  # one last try, whatever the backoff
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.cfg.drain_timeout)
            except TimeoutError:
                log.error("writer drain timed out", extra={"fields": {"table": self.name, "queued": self.queued()}})
            self._task = None
        self._keep_held()
        if self.spool is not None:
            self.spool.close()

    def _keep_held(self) -> None:
        """At close, rows only in memory go to the journal if it takes them now; the rest are lost, and said so."""
        held, self._held = list(self._held), deque()
        if not held:
            return
        kept = sum(1 for line in held if self.spool is not None and self.spool.append(line + b"\n", retry=True))
        if kept < len(held):
            self.dropped += len(held) - kept
            log.error(
                "rows lost at shutdown: neither the store nor the journal could take them",
                extra={"fields": {"table": self.name, "rows": len(held) - kept}},
            )

    async def _run(self) -> None:
        interval = self.cfg.flush_interval_ms / 1000.0
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            self.cycles += 1
            try:
                await self.flush()
            except Exception:  # the writer must outlive any surprise; the rows stay in the spool
                self.failed_cycles += 1
                log.exception("writer cycle failed")
                await asyncio.sleep(interval)
            if self._closing and (self._down or not (self._queue or self._held)):
                return

    # --- flushing -----------------------------------------------------------------------------------------
    async def flush(self) -> None:
        """One cycle: replay the spool if there is one (or probe a store that was down), then write the queue."""
        spool = self.spool
        if (self._down or (spool is not None and spool.pending)) and not await self._recover():
            return
        if not self._queue and not self._held:
            return
        started = time.perf_counter()
        rows, held = list(self._queue), list(self._held)
        self._queue.clear()
        self._held.clear()
        old = spool.rotate(keep=False) if spool is not None and rows else None
        try:
            ok = await self._insert(rows + held)
        except asyncio.CancelledError:  # the drain timed out mid-flush: nothing taken here may be lost
            if spool is not None and old is not None:
                spool.keep(old)
            self._hold(held)
            raise
        if ok:
            self._back()
            if spool is not None:
                spool.discard(old)
            if self._dropping and not self._held:
                self._dropping = False
                log.warning("rows are written again", extra={"fields": {"table": self.name, "dropped": self.dropped}})
        else:
            if spool is not None and old is not None:
                spool.keep(old)
            self.spooled += len(rows)
            self._hold(held)
            self._went_down()
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - started

    def _went_down(self) -> None:
        """The store is unreachable: journaled rows wait in the spool (the current segment too), not in memory."""
        now = time.monotonic()
        self._backoff = min(_MAX_BACKOFF, max(self.cfg.flush_interval_ms / 1000.0, self._backoff * 2))
        self._probe_at = now + self._backoff
        self._down = self._outage = True
        self._unqueued = True  # from now on the current segment is spool too
        self.spooled += len(self._queue)  # journaled there: they wait on disk, not in memory
        self._queue.clear()

    async def _recover(self) -> bool:
        """Replay spooled segments, oldest first; True when the spool is empty and the store takes rows.

        The writer acts as if the store were back from the first try: rows that arrive meanwhile are queued (and
        journaled in a fresh segment) as usual, so none can land in a segment that was already replayed. The
        segment written while the store was down is closed and replayed last, once the older ones went in (so a
        store still down costs no new file per probe); if any replay fails, the store is down again.
        """
        if self._down and time.monotonic() < self._probe_at:
            return False
        self._down = False
        spool = self.spool
        replayed_any = False
        while spool is not None:
            if not spool.pending:
                if not self._unqueued:
                    break
                spool.rotate(keep=True)  # the segment written while the store was down; from here rows are queued
                self._unqueued = False
                continue
            segment = spool.pending[0]
            replayed = await self._replay(spool, segment)
            if replayed is None:  # unreadable now: left on disk for the next start, never deleted unread
                spool.set_aside(segment)
                continue
            if not replayed:
                self._went_down()
                return False
            spool.discard(segment)
            replayed_any = True
            self._backoff = 0.0  # the store took rows: should it fail again, probing starts over
        if replayed_any:  # with nothing to replay, the next insert tells whether the store is back
            self._back()
        return True

    def _back(self) -> None:
        if self._outage:
            self._outage = False
            self._backoff = 0.0
            log.warning("store available again; spool replayed", extra={"fields": {"table": self.name}})

    async def _replay(self, spool: Spool, segment: Segment) -> bool | None:
        """True when the segment's rows are all in the store, False when the store failed, None when the segment
        cannot be read (it is kept as it is)."""
        rows_in = 0
        while True:
            try:
                rows, offset = await asyncio.to_thread(Spool.read, segment, self.cfg.max_rows)
            except FileNotFoundError:
                return True  # nothing left to replay
            except OSError as exc:
                log.error(
                    "spool segment unreadable; kept on disk for the next start",
                    extra={"fields": {"segment": segment.path.name, "error": exc.strerror or str(exc)}},
                )
                return None
            if offset == segment.offset:
                break
            if rows and not await self._insert(rows):
                return False
            spool.advance(segment, offset)
            rows_in += len(rows)
        if rows_in:
            log.info("spool replayed", extra={"fields": {"rows": rows_in, "segment": segment.path.name}})
        return True

    async def _insert(self, rows: list[Line]) -> bool:
        """Insert rows in batches; False if the store is unreachable (nothing is lost: the caller keeps them)."""
        size = self.cfg.max_rows
        for i in range(0, len(rows), size):
            batch = rows[i : i + size]
            try:
                self.written += await self._store_insert(batch)
            except StoreError as exc:
                self.store_errors += 1
                self.written += exc.written
                if exc.transient:
                    if not self._outage:
                        log.warning(
                            "store unavailable; spooling rows",
                            extra={"fields": {"table": self.name, "error": str(exc)[:200]}},
                        )
                    return False
                if not await self._one_by_one(batch):
                    return False
        return True

    async def _store_insert(self, rows: Sequence[Line]) -> int:
        return await self._insert_rows(rows)

    def queued(self) -> int:
        return len(self._queue) + len(self._held)

    async def _one_by_one(self, batch: list[Line]) -> bool:
        for row in batch:
            for attempt in (row, sanitised_line(row)):
                try:
                    self.written += await self._store_insert([attempt])
                    break
                except StoreError as exc:
                    if exc.transient:
                        return False
            else:
                self._dead_letter(row)
        return True

    def _dead_letter(self, row: Line) -> None:
        self.dead += 1
        path = self.dir / f"{self.name}.dead.jsonl"
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, row + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            log.error(
                "row refused by the store and not dead-lettered",
                extra={"fields": {"bytes": len(row), "error": exc.strerror or str(exc)}},
            )
            return
        log.error("row refused by the store; dead-lettered", extra={"fields": {"bytes": len(row)}})

    # --- state --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For `/readyz` detail: where rows are going now (no error text: that is for the logs)."""
        spool = self.spool
        return {
            "store": "down" if self._down else "ok",
            "journal": spool.state if spool is not None else "off",
            "held_rows": len(self._held),
            "spool_bytes": spool.used_bytes if spool is not None else 0,
            "dropped_rows": self.dropped,
        }

    # --- metrics ------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        label = (self.name,)
        spool = self.spool
        yield gauge("sidecar_writer_queue_depth", "Rows waiting to be written.", ("table",), {label: self.queued()})
        yield gauge(
            "sidecar_writer_held_rows",
            "Rows held only in memory (the journal failed, is full, or is off).",
            ("table",),
            {label: len(self._held)},
        )
        yield counter(
            "sidecar_writer_rows",
            "Rows by what happened to them.",
            ("table", "result"),
            {
                (*label, "written"): self.written,
                (*label, "spooled"): self.spooled,
                (*label, "unjournaled"): self.unjournaled,
                (*label, "dropped"): self.dropped,
                (*label, "dead_lettered"): self.dead,
            },
        )
        yield gauge(
            "sidecar_writer_store_up", "1 while the store takes rows.", ("table",), {label: 0 if self._down else 1}
        )
        state = spool.state if spool is not None else "off"
        yield gauge(
            "sidecar_writer_journal_state",
            "The journal's state: 1 for the current one.",
            ("table", "state"),
            {(*label, s): int(s == state) for s in ("ok", "failing", "full", "off")},
        )
        yield counter(
            "sidecar_writer_journal_failures",
            "Journal appends that failed (disk full, I/O error, read-only volume).",
            ("table",),
            {label: spool.failures if spool is not None else 0},
        )
        yield gauge(
            "sidecar_writer_spool_bytes",
            "Bytes in the journal not yet in the store.",
            ("table",),
            {label: spool.used_bytes if spool is not None else 0},
        )
        yield gauge(
            "sidecar_writer_spool_segments",
            "Spooled segments waiting for replay.",
            ("table",),
            {label: len(spool.pending) if spool is not None else 0},
        )
        yield counter("sidecar_writer_store_errors", "Failed store writes.", ("table",), {label: self.store_errors})
        yield counter(
            "sidecar_writer_failed_cycles",
            "Flush cycles ended by an unexpected error.",
            ("table",),
            {label: self.failed_cycles},
        )
        yield counter("sidecar_writer_flush_seconds", "Time spent flushing.", ("table",), {label: self.flush_seconds})
        yield counter("sidecar_writer_flushes", "Flush cycles.", ("table",), {label: self.flushes})
