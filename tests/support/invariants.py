"""What must hold after every test that starts a sidecar: no task still running sidecar code, nothing left open in
its data directory or on its port, no lease or reservation held, and a stored row for every request line."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sidecar as sidecar_package
from sidecar.runner import Server
from tests.support.waits import wait_for


def sidecar_tasks(before: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks started since `before` that are still running sidecar code."""
    package = str(Path(sidecar_package.__file__).parent) + os.sep
    left = []
    for task in asyncio.all_tasks() - before:
        if not task.done() and any(name.startswith(package) for name in _awaiting(task.get_coro())):
            left.append(repr(task)[:200])
    return left


def _awaiting(coro: Any) -> Iterator[str]:
    """The source files of a suspended coroutine and of everything it awaits, down the chain."""
    while coro is not None:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        if code is not None:
            yield code.co_filename
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def _tcp_ports() -> dict[str, tuple[int, int]]:
    """socket inode -> (local port, remote port) for this machine's TCP sockets."""
    ports = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            for line in list(f)[1:]:
                cols = line.split()
                ports[cols[9]] = (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16))
    return ports


def open_resources(server: Server) -> list[str]:
    """This process's descriptors that a stopped sidecar should have closed: files in its data directory, sockets
    on its port (its listener and accepted connections), and its upstream connection pool."""
    from sidecar.app import UPSTREAM

    data_dir = os.path.realpath(server.settings.server.data_dir) + os.sep
    ports = _tcp_ports()
    left = [] if server.app[UPSTREAM].closed else ["the upstream connection pool"]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(data_dir):
            left.append(target)
        elif target.startswith("socket:[") and ports.get(target[8:-1], (0, 0))[0] == server.port:
            left.append(f"{target} on port {server.port}")
    return left


async def check_invariants(server: Server) -> None:
    """After every functional test: no request still running, no lease slot or token reservation left."""
    from sidecar.app import LIMITS, PROXY

    proxy = server.app[PROXY]
    await wait_for(lambda: not proxy.in_flight.tasks, 10)
    assert server.app[LIMITS].local.totals() == (0, 0), "a lease slot or token reservation was left behind"
    assert server.app[LIMITS].local.global_active == 0


async def assert_stored(server: Server, request_ids: list[str]) -> None:
    from sidecar.store import open_store
    from sidecar.store.base import RequestQuery

    store = open_store(server.settings.store.url)
    await store.open()
    try:
        rows = await store.requests(RequestQuery(limit=1_000_000))
    finally:
        await store.close()
    stored = [r["request_id"] for r in rows]
    assert len(stored) == len(set(stored)), "duplicate request_log rows"
    assert set(stored) >= set(request_ids), f"{len(set(request_ids) - set(stored))} requests have no row"
