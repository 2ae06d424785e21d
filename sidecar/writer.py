"""BatchWriter: request records into the store in batches, off the hot path, losing none.

`put(row)` is synchronous and never awaits. With the spool on, it also appends the row to the current
journal segment (one `write(2)` into the page cache: it survives the process being killed). A flush cycle
rotates the segment, takes every queued row and inserts them in batches of `max_rows` with
`ON CONFLICT (request_id) DO NOTHING`; when they are all in, the old segment is deleted. If the store is
unreachable the segment is fsynced and kept: it *is* the spool, replayed (idempotently) once the store
answers again, also at the next start. A batch the store rejects for its data is retried row by row, each
failing row sanitised once and, if still refused, written to a dead-letter file, so one poison row cannot
lose the others. Without the spool, rows wait in memory up to `queue_size` and are dropped (and counted)
beyond it. On close the queue and spool are drained within `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.metrics_core import Metric

from sidecar.config import WriterCfg
from sidecar.metrics import counter, gauge
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.writer")
Row = dict[str, Any]
Line = bytes  # one row, JSON-encoded: what the journal holds and what the store unpacks
_MAX_TEXT = 4096
_INT64 = 2**63 - 1


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")[:_MAX_TEXT]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -_INT64 <= value <= _INT64:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sanitise(row: Row) -> Row:
    """A copy a database will take: valid UTF-8 text of bounded size, 64-bit integers, finite floats."""
    return {name: _clean(value) for name, value in row.items()}


def _dump(row: Row) -> bytes:
    try:
        return orjson.dumps(row)
    except (orjson.JSONEncodeError, TypeError):
        return orjson.dumps(sanitise(row), default=str)


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
        self._queue: deque[Line] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._fd = -1
        self._segment = 0
        self._store_down = False
        self.written = self.spooled = self.dropped = self.dead = self.store_errors = self.failed_cycles = 0
        self.flush_seconds = 0.0
        self.flushes = 0

    # --- hot path ---------------------------------------------------------------------------------------
    def put(self, row: Row) -> Line:
        """Queue one row; never awaits, never blocks on the store. Returns the row's JSON line."""
        line = _dump(row)
        if self.cfg.spool:
            os.write(self._fd, line + b"\n")
        elif len(self._queue) >= self.cfg.queue_size:
            self.dropped += 1
            return line
        self._queue.append(line)
        if len(self._queue) >= self.cfg.max_rows:
            self._wake.set()
        return line

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.cfg.spool:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            existing = self._segments()
            self._segment = (existing[-1][0] + 1) if existing else 1
            self._open_segment()
        await self._replay()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"writer-{self.name}")

    @property
    def alive(self) -> bool:
        """The writing task is running (it only ends on close)."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Drain: write what is queued (and spooled) within the drain timeout, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.cfg.drain_timeout)
            except TimeoutError:
                log.error("writer drain timed out", extra={"fields": {"queued": len(self._queue)}})
            self._task = None
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._remove_if_empty(self._path(self._segment))

    async def _run(self) -> None:
        interval = self.cfg.flush_interval_ms / 1000.0
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.flush()
                if self._store_down or self._has_spool():
                    await self._replay()
            except Exception:  # the writer must outlive any surprise; the rows stay in the spool
                self.failed_cycles += 1
                log.exception("writer cycle failed")
                await asyncio.sleep(interval)
            if self._closing and not self._queue:
                return

    # --- flushing -----------------------------------------------------------------------------------------
    async def flush(self) -> None:
        if not self._queue:
            return
        started = time.perf_counter()
        rows = list(self._queue)
        self._queue.clear()
        old = self._rotate() if self.cfg.spool else None
        ok = await self._insert(rows)
        if old is not None:
            if ok:
                old.unlink(missing_ok=True)
            else:
                self.spooled += len(rows)
        elif not ok:  # no spool: keep them in memory for the next cycle, within the bound
            room = max(0, self.cfg.queue_size - len(self._queue))
            self._queue.extendleft(reversed(rows[:room]))
            self.dropped += max(0, len(rows) - room)
        self.flushes += 1
        self.flush_seconds += time.perf_counter() - started

    async def _insert(self, rows: list[Line]) -> bool:
        """Insert rows in batches; False if the store is unreachable (nothing is lost: the caller keeps them)."""
        size = self.cfg.max_rows
        for i in range(0, len(rows), size):
            batch = rows[i : i + size]
            try:
                self.written += await self._store_insert(batch)
                self._store_down = False
            except StoreError as exc:
                self.store_errors += 1
                if exc.transient:
                    if not self._store_down:
                        log.warning("store unavailable; spooling rows", extra={"fields": {"error": str(exc)}})
                    self._store_down = True
                    return False
                if not await self._one_by_one(batch):
                    return False
        return True

    async def _store_insert(self, rows: Sequence[Line]) -> int:
        return await self._insert_rows(rows)

    def queued(self) -> int:
        return len(self._queue)

    async def _one_by_one(self, batch: list[Line]) -> bool:
        for row in batch:
            for attempt in (row, _sanitised_line(row)):
                try:
                    self.written += await self._store_insert([attempt])
                    break
                except StoreError as exc:
                    if exc.transient:
                        self._store_down = True
                        return False
            else:
                self._dead_letter(row)
        return True

    def _dead_letter(self, row: Line) -> None:
        self.dead += 1
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / f"{self.name}.dead.jsonl", "ab") as f:
            f.write(row + b"\n")
        log.error("row refused by the store; dead-lettered", extra={"fields": {"bytes": len(row)}})

    # --- spool segments -----------------------------------------------------------------------------------
    def _path(self, n: int) -> Path:
        return self.dir / f"{self.name}.{n:08d}.jsonl"

    def _segments(self) -> list[tuple[int, Path]]:
        if not self.dir.exists():
            return []
        out = []
        for p in self.dir.glob(f"{self.name}.*.jsonl"):
            middle = p.name[len(self.name) + 1 : -len(".jsonl")]
            if middle.isdigit():
                out.append((int(middle), p))
        return sorted(out)

    def _open_segment(self) -> None:
        self._fd = os.open(self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _rotate(self) -> Path:
        """Close the current segment (its rows are the ones just taken) and start the next one."""
        old_fd, old = self._fd, self._path(self._segment)
        self._segment += 1
        self._open_segment()
        if self._store_down:
            os.fsync(old_fd)  # it may be the spool for a while: make it durable
        os.close(old_fd)
        return old

    def _has_spool(self) -> bool:
        return any(n != self._segment for n, _ in self._segments())

    async def _replay(self) -> None:
        for n, path in self._segments():
            if n == self._segment and self._fd >= 0:
                continue
            rows = list(_read_rows(path))
            if rows and not await self._insert(rows):
                return  # still down: try again next cycle
            path.unlink(missing_ok=True)
            if rows:
                log.info("spool replayed", extra={"fields": {"rows": len(rows), "segment": path.name}})

    @staticmethod
    def _remove_if_empty(path: Path) -> None:
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()

    # --- metrics ------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        label = (self.name,)
        yield gauge("sidecar_writer_queue_depth", "Rows waiting to be written.", ("table",), {label: len(self._queue)})
        yield counter(
            "sidecar_writer_rows",
            "Rows by what happened to them.",
            ("table", "result"),
            {
                (*label, "written"): self.written,
                (*label, "spooled"): self.spooled,
                (*label, "dropped"): self.dropped,
                (*label, "dead_lettered"): self.dead,
            },
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


def _read_rows(path: Path) -> Iterator[Line]:
    with open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n"):  # a torn last line (killed mid-write) is skipped, not fatal
                try:
                    orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                yield line.rstrip(b"\n")


def _sanitised_line(line: Line) -> Line:
    try:
        return _dump(sanitise(orjson.loads(line)))
    except orjson.JSONDecodeError:
        return b"{}"
