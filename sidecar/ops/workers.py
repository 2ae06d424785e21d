"""Workers: `server.workers = N` processes serving one port, each a whole sidecar (its own event loop, upstream
pool, journal and dispatch queue), started and watched by a parent that serves nothing.

The parent forks worker 0 and waits until it listens (it makes the pepper, migrates the store and mints the demo
key: nothing two processes should race for), then the others, and waits until they listen too. Each worker binds
`server.port` with SO_REUSEPORT, so the kernel spreads connections across them; its operations port is
`ops_port + i`. Worker 0 keeps its journal where one process alone does (`<data_dir>/spool`), worker i > 0 in
`<data_dir>/spool/worker-<i>`; segments left under an index that no longer runs (workers lowered) move into
worker 0's at the next start, so no row waits for a worker that never comes back.

SIGTERM or SIGINT to the parent goes to every worker, which drains as one process does; the parent waits for all
and exits with the worst status (0 when every worker drained). A worker that exits while the parent is not
stopping is restarted under its index (the new one replays its journal), unless it never listened or its last
restart was less than `CRASH_LOOP` seconds ago: then the parent stops the others and exits with that status (a
pod's restart policy takes over). A worker
whose parent is gone (killed without a goodbye) drains and exits too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from sidecar.config import Settings
from sidecar.ops.logs import event

log = logging.getLogger("sidecar.workers")
CRASH_LOOP = 10.0  # seconds: a worker that dies again this soon after its restart is not restarted again
SIGNALS = (signal.SIGTERM, signal.SIGINT)
WorkerMain = Callable[[int, Callable[[], None]], int]  # (index, ready) -> exit status; `ready` once it listens


def spool_dir(data_dir: str, worker: int | None) -> str:
    """Where worker `worker`'s journal is (None: the one process of `workers = 1`, where worker 0's is too)."""
    base = Path(data_dir) / "spool"
    return str(base if not worker else base / f"worker-{worker}")


def worker_settings(settings: Settings, worker: int) -> Settings:
    """Worker `worker`'s settings: its own operations port, and its share of `limits.global_concurrency` (the
    engine is one for all of them)."""
    n = settings.server.workers
    server = settings.server
    limits = settings.limits
    if server.ops_port:
        server = replace(server, ops_port=server.ops_port + worker)
    if limits.global_concurrency:
        limits = replace(limits, global_concurrency=max(1, math.ceil(limits.global_concurrency / n)))
    return replace(settings, server=server, limits=limits)


def adopt_orphans(data_dir: str, workers: int) -> int:
    """Move the journal segments of worker indexes >= `workers` (none of them runs) into worker 0's journal, to be
    replayed there (idempotently: a row already stored is skipped). Runs before any worker starts. The number
    of segments moved."""
    base = Path(data_dir) / "spool"
    moved = 0
    for old in sorted(base.glob("worker-*")) if base.is_dir() else ():
        index = old.name.removeprefix("worker-")
        if not index.isdigit() or int(index) < workers:
            continue
        for segment in sorted(old.glob("*.*.jsonl")):
            name, number = segment.name[: -len(".jsonl")].rsplit(".", 1)
            if not number.isdigit():
                continue  # a dead-letter file: for a person to read, it stays
            taken = [int(p.name[len(name) + 1 : -len(".jsonl")]) for p in base.glob(f"{name}.*.jsonl")]
            free = max([n for n in taken if n >= 0], default=0) + 1
            segment.rename(base / f"{name}.{free}.jsonl")
            moved += 1
    if moved:
        event(log, "journal segments of workers no longer running moved to worker 0's", segments=moved)
    return moved


def _status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signal number


@dataclass
class _Child:
    index: int
    started: float


class Supervisor:
    """The parent: forks the workers, forwards the stop signals, restarts a worker that died, reaps them all."""

    def __init__(self, workers: int, main: WorkerMain) -> None:
        self.workers = workers
        self.main = main
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self.worst = 0
        self._restarted: dict[int, float] = {}  # worker index -> when it was last restarted (monotonic)
        self._lifeline = (-1, -1)

    def run(self) -> int:
        self._lifeline = os.pipe()  # its write end dies with this process: a worker whose parent is gone stops
        for sig in SIGNALS:
            signal.signal(sig, self._forward)
        for index in range(self.workers):
            if self.stopping or not self._start(index):
                break  # told to stop meanwhile, or a worker could not start: the others drain
        if not self.stopping:
            event(log, "workers listening", workers=self.workers, pids=sorted(self.children))
        while self.children:
            pid, status = os.wait()
            self._exited(pid, _status(status))
        event(log, "workers stopped", status=self.worst)
        return self.worst

    def _forward(self, sig: int, _: FrameType | None) -> None:
        """SIGTERM/SIGINT: every worker drains (a second signal hurries them, as it does one process)."""
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _start(self, index: int, wait: bool = True) -> bool:
        """Fork worker `index`; with `wait`, until it listens: False (and the others stopping) when it died first."""
        ready_r, ready_w = os.pipe()
        # Blocked across the fork: a signal for the new worker waits until its loop's handlers are in place
        # (`sidecar.runner.serve` unblocks them), and this process takes its own when unblocked again.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(ready_r)
                self._child(index, ready_w)
            self.children[pid] = _Child(index, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        os.close(ready_w)
        try:
            if not wait:
                return True
            if os.read(ready_r, 1):
                return True
        finally:
            os.close(ready_r)
        _, status = os.waitpid(pid, 0)  # it closed the pipe without a word: it exited before listening
        self.children.pop(pid, None)
        self._failed(index, _status(status))
        return False

    def _child(self, index: int, ready_w: int) -> None:
        """In the new process: run the worker and leave without the parent's cleanups (`os._exit`)."""
        code = 1
        try:
            os.setpgid(0, 0)  # a terminal's ^C reaches the parent only, which forwards it once
            os.close(self._lifeline[1])
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            threading.Thread(target=_watch_parent, args=(self._lifeline[0],), daemon=True).start()

            def ready() -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_w, b"1")
                    os.close(ready_w)

            code = self.main(index, ready)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except (Exception, KeyboardInterrupt):  # a worker's crash is told, then it exits (os._exit) with `code`
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _exited(self, pid: int, code: int) -> None:
        child = self.children.pop(pid, None)
        if child is None:
            return
        if self.stopping:
            self.worst = max(self.worst, code)
            return
        now = time.monotonic()
        if now - self._restarted.get(child.index, -CRASH_LOOP) < CRASH_LOOP:
            self._failed(child.index, code)  # its restart died too, and soon: it will not get better by itself
            return
        self._restarted[child.index] = now
        ran = round(now - child.started, 1)
        event(log, "worker exited: restarting it", worker=child.index, pid=pid, status=code, ran_s=ran)
        self._start(child.index, wait=False)

    def _failed(self, index: int, code: int) -> None:
        """A worker that could not start or keeps dying: the others drain and the parent exits with its status."""
        log.error("worker exited early: stopping the others", extra={"fields": {"worker": index, "status": code}})
        self.worst = max(self.worst, code, 1)
        self._forward(signal.SIGTERM, None)


def _watch_parent(fd: int) -> None:
    """In a worker: the read end of the parent's lifeline; end of file means the parent is gone: drain."""
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


def port_taken(host: str, port: int) -> OSError | None:
    """Whether another process listens on `host:port` already: SO_REUSEPORT would let the workers join a stranger's
    port in silence (any process of this user that set it too), so the parent asks first, without it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the listeners: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None
