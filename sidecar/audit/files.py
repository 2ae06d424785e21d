"""File-like audit sinks, each written from its own daemon thread: stderr (JSON lines) and rotating JSONL."""

from __future__ import annotations

import asyncio
import gzip
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

_POLL = 0.02  # seconds between the worker's looks at its queue when it found it empty
_BATCH = 512


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
            self._stop.wait(_POLL)

    def write(self, line: bytes) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called on the worker thread at shutdown, after the last record."""


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
    """A file per segment (`audit-<utc time>-<n>.jsonl[.gz]`), 0600 in a 0700 dir, rotated by size or age,
    fsynced when rotated and at shutdown."""

    name = "jsonl"

    def __init__(self, queue_size: int, directory: str, max_bytes: int, max_age: float, gzip_on: bool) -> None:
        super().__init__(queue_size)
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.gzip = gzip_on
        self._file: IO[bytes] | None = None
        self._raw: IO[bytes] | None = None
        self._size = 0
        self._opened = 0.0
        self._n = 0

    def _open(self) -> None:
        if self._n == 0:  # created on first use: a sidecar that never audits leaves no empty directory
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.dir, 0o700)
        self._n += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = self.dir / f"audit-{stamp}-{os.getpid()}-{self._n:05d}.jsonl{'.gz' if self.gzip else ''}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._raw = self._file = os.fdopen(fd, "ab")
        self._size = 0
        self._opened = time.monotonic()

    def _close_segment(self) -> None:
        if self._file is None or self._raw is None:
            return
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        self._file = self._raw = None

    def write(self, line: bytes) -> None:
        if self._file is not None and (self._size >= self.max_bytes or time.monotonic() - self._opened >= self.max_age):
            self._close_segment()
        if self._file is None:
            self._open()
        assert self._file is not None
        # With gzip, every record is a gzip member of its own: a segment is readable (zcat) while it is
        # being written, and a crash loses at most the record being written.
        self._file.write(gzip.compress(line, 6) if self.gzip else line)
        self._file.flush()
        self._size += len(line)

    def finish(self) -> None:
        self._close_segment()


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
