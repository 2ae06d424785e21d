"""File-like audit sinks, each written from its own daemon thread: stderr (JSON lines) and rotating JSONL.

The JSONL sink writes each batch of whole records straight to the segment's descriptor (no buffer of ours or
Python's that could keep a remainder for the next write), and a write that fails part way (a full disk) is cut
back to where the batch began: a segment holds whole records only, and the batch is counted failed. When
even that cut fails, the segment is left as it is and the next batch starts a new one, so nothing is ever
appended after a torn record. Segments last written longer ago than `audit.jsonl_retention` are deleted, by
the sink's thread, at start and then every `SWEEP_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

_POLL = 0.02  # seconds between the worker's looks at its queue when it found it empty
_BATCH = 512
SWEEP_EVERY = 600.0  # seconds between looks for segments past their retention
log = logging.getLogger("sidecar.audit")


class ThreadedSink:
    """A bounded queue drained by one daemon thread calling `write(lines)`; subclasses implement write/finish.

    The queue is a plain deque (appends and pops are atomic under the GIL) that the worker polls: a request
    never signals the thread. A `queue.Queue` put costs a lock and a condition notify, and every wake-up it
    causes hands the GIL to the worker and back: at thousands of records a second that was most of the
    audit's cost on the event loop. Records wait at most `_POLL` seconds longer for it.
    """

    name = "base"

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._queue: deque[bytes] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = self.failed = self.dropped = 0

    def offer(self, line: bytes, record: dict[str, Any]) -> bool:
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            return False
        self._queue.append(line)
        return True

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"audit-{self.name}", daemon=True)
        self._thread.start()

    async def close(self, timeout: float) -> None:
        """Ask the worker to write what is queued and stop; a stuck sink is left behind after `timeout`."""
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, timeout)
        self._thread = None

    def results(self) -> dict[str, int]:
        return {"written": self.written, "failed": self.failed, "dropped": self.dropped}

    def _loop(self) -> None:
        queue = self._queue
        while True:
            stopping = self._stop.is_set()  # read before draining: nothing offered before close() is missed
            while queue:
                batch = [queue.popleft() for _ in range(min(len(queue), _BATCH))]
                try:
                    self.write(b"".join(batch))
                    self.written += len(batch)
                except OSError:
                    self.failed += len(batch)
            if stopping:
                self.finish()
                return
            self.tick()
            self._stop.wait(_POLL)

    def write(self, line: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called on the worker thread at shutdown, after the last record."""

    def tick(self) -> None:
        """Called on the worker thread between looks at the queue (housekeeping; cheap when there is none)."""


class StderrSink(ThreadedSink):
    name = "stderr"

    def __init__(self, queue_size: int, fd: int = 2) -> None:
        super().__init__(queue_size)
        self.fd = fd

    def write(self, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view) :]


class JsonlSink(ThreadedSink):
    """A file per segment (`audit-<utc time>-<pid>-<n>.jsonl[.gz]`), 0600 in a 0700 dir, rotated by size or age,
    fsynced when rotated and at shutdown; whole records only (a failed write is cut back); segments older than
    `retention` seconds (0: kept) deleted."""

    name = "jsonl"

    def __init__(
        self, queue_size: int, directory: str, max_bytes: int, max_age: float, gzip_on: bool, retention: float = 0.0
    ) -> None:
        super().__init__(queue_size)
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.gzip = gzip_on
        self.retention = retention
        self.deleted = 0  # segments deleted past their retention
        self._fd: int | None = None
        self._path: Path | None = None
        self._end = 0  # where the segment's last whole record ends: a failed write is cut back to it
        self._size = 0
        self._opened = 0.0
        self._n = 0
        self._sweep_at = 0.0  # the first tick sweeps

    def _open(self) -> None:
        if self._n == 0:  # created on first use: a sidecar that never audits leaves no empty directory
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.dir, 0o700)
        self._n += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = self.dir / f"audit-{stamp}-{os.getpid()}-{self._n:05d}.jsonl{'.gz' if self.gzip else ''}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._path = path
        self._end = os.fstat(self._fd).st_size
        self._size = 0
        self._opened = time.monotonic()

    def _close_segment(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, line: bytes) -> None:
        if self._fd is not None and (self._size >= self.max_bytes or time.monotonic() - self._opened >= self.max_age):
            self._close_segment()
        if self._fd is None:
            self._open()
        assert self._fd is not None
        # With gzip, every batch is a gzip member of its own: a segment is readable (zcat) while it is
        # being written.
        data = gzip.compress(line, 6) if self.gzip else line
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self._cut_back()
            raise
        self._end += len(data)
        self._size += len(line)

    def _cut_back(self) -> None:
        """A write failed part way: the segment back to its last whole record; if even that fails, the segment
        is left (its tail torn) and the next batch starts a new one, so no record follows the torn one."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._end)
        except OSError:
            fd, self._fd, self._path = self._fd, None, None
            os.close(fd)

    def finish(self) -> None:
        self._close_segment()

    def tick(self) -> None:
        if self.retention > 0 and time.monotonic() >= self._sweep_at:
            self._sweep_at = time.monotonic() + SWEEP_EVERY
            self.sweep()

    def sweep(self) -> int:
        """Delete the segments (any replica's, in this directory) last written before the retention; how many."""
        oldest = time.time() - self.retention
        deleted = 0
        try:
            paths = [p for p in self.dir.iterdir() if p.name.startswith("audit-") and ".jsonl" in p.name]
        except OSError:  # not created yet (nothing audited), or unreadable: nothing to delete
            return 0
        for path in paths:
            try:
                if path != self._path and path.stat().st_mtime < oldest:
                    path.unlink()
                    deleted += 1
            except OSError:  # deleted by another replica meanwhile, or not ours to delete
                continue
        if deleted:
            self.deleted += deleted
            log.info(
                "audit segments past audit.jsonl_retention deleted",
                extra={"fields": {"segments": deleted, "dir": str(self.dir)}},
            )
        return deleted


def read_jsonl(directory: str, since: float, until: float | None, key_id: str | None) -> Iterator[dict[str, Any]]:
    """The records a JsonlSink wrote into `directory` (plain or gzip segments, oldest first), filtered, one
    at a time. A line that does not parse (the record being written when a process died) is skipped."""
    root = Path(directory)
    if not root.is_dir():
        return
    for path in sorted(p for p in root.iterdir() if p.name.startswith("audit-") and ".jsonl" in p.name):
        try:
            if path.stat().st_mtime < since:  # last written before `since`: nothing in it is new enough
                continue
        except OSError:  # rotated away meanwhile
            continue
        for line in _lines(path):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            at = record.get("emitted_at") if isinstance(record, dict) else None
            if not isinstance(at, int | float) or at < since or (until is not None and at >= until):
                continue
            if key_id is None or record.get("key_id") == key_id:
                yield record


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            yield from f
    except (OSError, EOFError):  # a gzip member cut short: the lines before it were read
        return
