"""Spool: the append-only journal segments behind a BatchWriter, tracked in memory, bounded in bytes.

Every row the writer takes is appended (one `write(2)` into the page cache) to the *current* segment
`<dir>/<name>.<n>.jsonl`, so a killed process loses nothing. A segment that is closed while its rows are not
known to be in the store is *spooled*: it waits in `pending`, oldest first, to be replayed. The directory is
listed once, at open (segments left by an earlier run are pending); after that every segment is known here,
so no flush cycle ever lists a directory on the event loop.

Failures never escape: an `append` that fails (disk full, EIO, a read-only volume) returns False, the torn
bytes are cut off again, and the journal is `failing` until a later append (tried at most once a second)
succeeds; the writer then holds the row in memory instead. Past `max_bytes` on disk the journal is `full`:
new rows are not journaled (the rows already spooled, the oldest, are kept) until replay frees space.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("sidecar.writer")

RETRY_SECONDS = 1.0  # a failing journal is tried again at most this often
OK, FAILING, FULL = "ok", "failing", "full"


@dataclass(slots=True)
class Segment:
    number: int
    path: Path
    size: int = 0
    offset: int = 0  # replay progress: bytes already in the store


class Spool:
    def __init__(self, directory: str, name: str, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.name = name
        self.max_bytes = max_bytes
        self.pending: deque[Segment] = deque()
        self.current: Segment | None = None
        self.state = OK
        self.failures = 0  # appends that failed
        self._fd = -1
        self._retry_at = 0.0
        self._torn = False  # a failed write could not be cut off: the next append starts a new segment
        self._next = 1
        self._pending_bytes = 0

    # --- lifecycle ----------------------------------------------------------------------------------------
    def open(self) -> None:
        """List the segments an earlier run left (all pending) and start a new current segment."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            found = sorted(self._listing())
        except OSError as exc:
            self._fail(exc)
            return
        for number, path in found:
            size = path.stat().st_size
            if size:
                self._add_pending(Segment(number, path, size))
            else:
                path.unlink(missing_ok=True)
        self._next = (found[-1][0] + 1) if found else 1
        self._start_segment()

    def _listing(self) -> Iterator[tuple[int, Path]]:
        for path in self.dir.glob(f"{self.name}.*.jsonl"):
            middle = path.name[len(self.name) + 1 : -len(".jsonl")]
            if middle.isdigit():
                yield int(middle), path

    def close(self) -> None:
        """Make the current segment durable and close it (an empty one is removed)."""
        current, self.current = self.current, None
        if self._fd < 0 or current is None:
            return
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):  # a failing disk must not fail the shutdown: the page cache has it
            os.fsync(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if current.size == 0:
            with contextlib.suppress(OSError):
                current.path.unlink()

    # --- writing ------------------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        """Bytes of the journal on disk: pending segments (whole: a file is deleted once replayed) and the current."""
        return self._pending_bytes + (self.current.size if self.current is not None else 0)

    def append(self, line: bytes, retry: bool = False) -> bool:
        """Journal one row (`line` ends with a newline); False when it is not on disk (the caller keeps it).
        A failing journal is tried again at most once a second, or now when `retry` (at shutdown)."""
        if self.state == FAILING and not self._retry(now=retry):
            return False
        if self.used_bytes + len(line) > self.max_bytes:
            self._set_state(FULL, None)
            return False
        current = self.current
        if current is None:
            return False
        written = 0
        try:
            while written < len(line):
                written += os.write(self._fd, line[written:] if written else line)
        except OSError as exc:
            self._cut(current, written)
            self._fail(exc)
            return False
        current.size += written
        if self.state != OK:
            self._set_state(OK, None)
        return True

    def _cut(self, current: Segment, written: int) -> None:
        """Remove a partly written line, so the next line does not glue onto it."""
        if not written:
            return
        try:
            os.ftruncate(self._fd, current.size)
        except OSError:
            self._torn = True

    def _retry(self, now: bool = False) -> bool:
        """Whether a failing journal may be tried now (once a second), with a fresh segment when it needs one."""
        clock = time.monotonic()
        if clock < self._retry_at and not now:
            return False
        self._retry_at = clock + RETRY_SECONDS
        if self._fd < 0 or self._torn:
            self._torn = False
            self.rotate(keep=True)
        return self._fd >= 0

    def _fail(self, exc: OSError) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._set_state(FAILING, exc)

    def _set_state(self, state: str, exc: OSError | None) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        fields = {"spool": self.name, "state": state, "was": previous, "spool_bytes": self.used_bytes}
        if exc is not None:
            fields["error"] = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        if state == FAILING:
            log.warning("journal write failed: rows are held in memory until it works again", extra={"fields": fields})
        elif state == FULL:
            log.error("spool reached writer.spool_max_bytes: new rows are held in memory", extra={"fields": fields})
        else:
            log.warning("journal writable again", extra={"fields": fields})

    # --- segments -----------------------------------------------------------------------------------------
    def _start_segment(self) -> None:
        number = self._next
        self._next += 1
        path = self.dir / f"{self.name}.{number:08d}.jsonl"
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            self._fd = -1
            self.current = None
            self._fail(exc)
            return
        self.current = Segment(number, path)

    def rotate(self, *, keep: bool, durable: bool = False) -> Segment | None:
        """Close the current segment and start the next. `keep`: it goes to `pending` (its rows are spooled);
        otherwise it is returned, for the caller to `discard` once its rows are in the store."""
        old, fd = self.current, self._fd
        self._fd, self.current = -1, None
        if fd >= 0:
            if durable:
                with contextlib.suppress(OSError):
                    os.fsync(fd)  # it may be the spool for a while
            with contextlib.suppress(OSError):
                os.close(fd)
        self._start_segment()
        if old is None:
            return None
        if old.size == 0:
            self.discard(old)
            return None
        if keep:
            self._add_pending(old)
            return None
        return old

    def keep(self, segment: Segment) -> None:
        """A segment returned by `rotate` whose rows the store did not take: it is spooled."""
        self._add_pending(segment)

    def _add_pending(self, segment: Segment) -> None:
        self.pending.append(segment)
        self._pending_bytes += segment.size

    def advance(self, segment: Segment, offset: int) -> None:
        """Replay progress: the segment's rows before `offset` are in the store (its file stays until discarded)."""
        segment.offset = offset

    def set_aside(self, segment: Segment) -> None:
        """A pending segment that cannot be read now: no longer replayed by this process, left on disk."""
        if segment in self.pending:
            self.pending.remove(segment)
            self._pending_bytes -= segment.size

    def discard(self, segment: Segment | None) -> None:
        """A segment whose rows are all in the store."""
        if segment is None:
            return
        if segment in self.pending:
            self.pending.remove(segment)
            self._pending_bytes -= segment.size
        with contextlib.suppress(OSError):
            segment.path.unlink(missing_ok=True)

    @staticmethod
    def read(segment: Segment, max_rows: int) -> tuple[list[bytes], int]:
        """Up to `max_rows` whole rows from the segment's replay offset, and the offset after them.

        Blocking file I/O: the writer runs it in a thread. A torn or garbled line (a write cut by a crash or
        a full disk) is skipped, not fatal.
        """
        rows: list[bytes] = []
        with open(segment.path, "rb") as f:
            f.seek(segment.offset)
            offset = segment.offset
            while len(rows) < max_rows:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # the end, or a torn last line
                offset += len(line)
                try:
                    orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                rows.append(line[:-1])
        return rows, offset
