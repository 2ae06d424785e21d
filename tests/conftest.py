from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.config import Settings, load
from sidecar.ops.logs import REQUEST_LOGGER
from sidecar.runner import Server
from tests.fake_upstream import FakeUpstream
from tests.helpers import free_port, reap, wait_for
from tests.invariants import assert_stored, check_invariants, open_resources, sidecar_tasks

pytest_plugins = ["tests.pg_fixtures"]
__all__ = ["free_port", "reap", "wait_for"]  # imported by the tests from here


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
        self.tracebacks: list[str] = []  # aiohttp's "Error handling request": a handler raised, a defect

    def emit(self, record: logging.LogRecord) -> None:
        fields = record.__dict__.get("fields")
        if record.name == REQUEST_LOGGER and isinstance(fields, dict):
            self.rows.append(dict(fields))
        self.lines.append(self.format(record) + repr(record.__dict__.get("fields")))
        if record.name.startswith("aiohttp") and record.exc_info and record.levelno >= logging.ERROR:
            self.tracebacks.append(self.format(record) + "\n" + logging.Formatter().formatException(record.exc_info))


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
    assert not log_catcher.tracebacks, f"a handler raised: {log_catcher.tracebacks}"
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


@pytest.fixture
async def sidecar(fake: FakeUpstream, sidecar_factory: Callable[..., Awaitable[Running]]) -> Running:
    return await sidecar_factory(fake.url)
