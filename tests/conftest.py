from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

import sidecar as sidecar_package
from sidecar.config import Settings, load
from sidecar.logs import REQUEST_LOGGER
from sidecar.runner import Server
from tests.fake_upstream import FakeUpstream


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Any:
    """The tests run on uvloop, the loop `sidecar serve` runs on (SIDECAR_TEST_LOOP=asyncio for the stdlib's)."""
    if os.environ.get("SIDECAR_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


class RecordCatcher(logging.Handler):
    """Collects the structured request log lines the sidecar emits (its real output path)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = record.__dict__.get("fields")
        if record.name == REQUEST_LOGGER and isinstance(fields, dict):
            self.rows.append(dict(fields))
        self.lines.append(self.format(record) + repr(record.__dict__.get("fields")))


@pytest.fixture
def log_catcher() -> Any:
    catcher = RecordCatcher()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.INFO)
    root.addHandler(catcher)
    yield catcher
    root.removeHandler(catcher)
    root.setLevel(old)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    server = TestServer(upstream.app(), host="127.0.0.1")
    await server.start_server()
    upstream.url = f"http://127.0.0.1:{server.port}/v1"
    yield upstream
    await server.close()


def make_settings(upstream_url: str, tmp_path: Any, **options: Any) -> Settings:
    flags = {
        "upstream.url": upstream_url,
        "server.port": 0,
        "server.data_dir": str(tmp_path),
        "store.url": f"sqlite:///{tmp_path}/sidecar.db",
        "server.drain_grace": 0,
        "server.request_log": str(tmp_path / "requests.jsonl"),
        "server.log_flush_ms": 0,
        "auth.enabled": False,  # the relay tests; key and lease tests turn it on
        "writer.flush_interval_ms": 20,
    }
    flags.update({k.replace("__", "."): v for k, v in options.items()})
    return load(None, {}, flags)


@dataclass
class Running:
    server: Server
    url: str
    port: int
    catcher: RecordCatcher
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The request log lines written so far (the JSON lines the sidecar emits per request)."""
        path = self.server.settings.server.request_log
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]

    async def stored(self, expect: int | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """request_log rows in the store, oldest first; waits until `expect` rows are there."""
        from sidecar.app import STORE
        from sidecar.store.base import RequestQuery, StoreError

        store = self.server.app[STORE]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                rows = await store.requests(RequestQuery(limit=100000))
            except StoreError:  # a store coming back (the fault tests): ask again until the deadline
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.1)
                continue
            if expect is None or len(rows) >= expect or loop.time() > end:
                return sorted(rows, key=lambda r: r["started_at"])
            await asyncio.sleep(0.02)

    def log_text(self) -> str:
        """Everything the sidecar logged: request lines and other log records."""
        with open(self.server.settings.server.request_log) as f:
            return f.read() + "\n".join(self.catcher.lines)


@pytest.fixture
async def sidecar_factory(
    tmp_path: Any, log_catcher: RecordCatcher
) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Server] = []

    async def start(upstream_url: str, **options: Any) -> Running:
        server = Server(make_settings(upstream_url, tmp_path, **options))
        await server.start()
        started.append(server)
        return Running(server, f"http://127.0.0.1:{server.port}", server.port, log_catcher)

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    tasks_before = asyncio.all_tasks()
    try:
        yield start
        for server in started:
            await check_invariants(server)
    finally:
        for server in started:
            await server.runner.cleanup()
        gc.collect()  # "Task exception was never retrieved" and unclosed transports report when collected
        await asyncio.sleep(0)
        loop.set_exception_handler(previous)
    assert not unhandled, f"unhandled errors in the event loop: {unhandled}"
    await wait_for(lambda: not sidecar_tasks(tasks_before), 3.0, lambda: f"tasks left: {sidecar_tasks(tasks_before)}")
    for server in started:
        await wait_for(lambda: not open_resources(server), 3.0, lambda: f"left open: {open_resources(server)}")
    for server in started:  # after the writer drained: every request line has exactly one stored row
        path = server.settings.server.request_log
        logged = []
        if os.path.exists(path):
            with open(path, "rb") as f:
                logged = [orjson.loads(line)["request_id"] for line in f]
        assert len(logged) == len(set(logged)), "a request was finished twice"
        await assert_stored(server, logged)


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
    from sidecar.app import LEASES, PROXY

    proxy = server.app[PROXY]
    await wait_for(lambda: not proxy.in_flight.tasks, 10)
    assert server.app[LEASES].totals() == (0, 0), "a lease slot or token reservation was left behind"
    assert server.app[LEASES].global_active == 0


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


@pytest.fixture
async def sidecar(fake: FakeUpstream, sidecar_factory: Callable[..., Awaitable[Running]]) -> Running:
    return await sidecar_factory(fake.url)


def reap(proc: Any, timeout: float = 30) -> int:
    """End a test's subprocess if it still runs, wait for it, and close its pipes (no ResourceWarning)."""
    if proc.poll() is None:
        proc.kill()
    rc = int(proc.wait(timeout))
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return rc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, why: Callable[[], str] = lambda: "condition not met in time"
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(why())
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def pg_server() -> Any:
    from tests.pg import PgServer, find_bin

    bindir = find_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries are missing in CI (apt-get install postgresql)")
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    server = PgServer(bindir)
    server.init()
    yield server
    server.destroy()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    import uuid

    return str(pg_server.create_db("t_" + uuid.uuid4().hex[:12]))


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: Any, tmp_path: Any) -> str:
    """Each store test runs against both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return str(request.getfixturevalue("pg_url"))
