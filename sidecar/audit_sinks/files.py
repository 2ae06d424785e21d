"""File-like audit sinks, each written from its own daemon thread: stderr (JSON lines) and rotating JSONL."""

from __future__ import annotations

import asyncio
import gzip
import os
import queue
import threading
import time
from pathlib import Path
from typing import IO, Any

_STOP = b""
_BATCH = 512


class ThreadedSink:
    """A bounded queue drained by one daemon thread calling `write(line)`; subclasses implement write/flush."""

    name = "base"

    def __init__(self, queue_size: int) -> None:
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.written = self.failed = self.dropped = 0

    def offer(self, line: bytes, record: dict[str, Any]) -> bool:
        try:
            self._queue.put_nowait(line)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"audit-{self.name}", daemon=True)
        self._thread.start()

    async def close(self, timeout: float) -> None:
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # a stuck sink cannot even take the stop marker: do not wait on it
            try:
                self._queue.put_nowait(_STOP)
                break
            except queue.Full:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(self._thread.join, max(0.0, deadline - time.monotonic()))
        self._thread = None

    def results(self) -> dict[str, int]:
        return {"written": self.written, "failed": self.failed, "dropped": self.dropped}

    def _loop(self) -> None:
        while True:
            # Take everything queued at once: one wake-up and one write per batch, not per record (each
            # wake-up of this thread costs the event loop a GIL hand-over).
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in batch
            lines = [line for line in batch if line is not _STOP and line != _STOP]
            if lines:
                try:
                    self.write(b"".join(lines))
                    self.written += len(lines)
                except OSError:
                    self.failed += len(lines)
            if stop:
                self.finish()
                return

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
