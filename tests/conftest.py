"""The suite's fixtures: the event loop it runs on (uvloop, as `sidecar serve`), a fake upstream per test (`fake`),
sidecars in the test's loop (`sidecar_factory`, `sidecar`) checked against the invariants when the test ends, and
the log lines they emit (`log_catcher`). Helpers live in `tests/support/`."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.runner import Server
from tests.support.fake_upstream import FakeUpstream
from tests.support.invariants import assert_stored, check_invariants, open_resources, sidecar_tasks
from tests.support.sidecars import RecordCatcher, Running, make_settings
from tests.support.waits import wait_for

pytest_plugins = ["tests.support.fixtures"]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Any:
    """The tests run on uvloop, the loop `sidecar serve` runs on (SIDECAR_TEST_LOOP=asyncio for the stdlib's)."""
    if os.environ.get("SIDECAR_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


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
