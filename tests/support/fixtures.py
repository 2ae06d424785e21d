"""Fixtures shared by many test files (registered by `tests/conftest.py`): the session's throwaway PostgreSQL
(`pg_server`) and real OpenID provider (`oidc_provider`), a fresh database per test (`pg_url`), `store_url` (a
store test against SQLite and PostgreSQL both), a fault-injecting proxy in front of PostgreSQL (`pg_proxy`), helm
(`helm`) and a real llama-server (`llama`, one per test module)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.support.faults import FaultProxy
from tests.support.helm import ensure_helm
from tests.support.llama import LlamaServer, cache_dir


@pytest.fixture(scope="session")
def pg_server() -> Any:
    from tests.support.postgres import PgServer, find_bin

    bindir = find_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries are missing in CI (apt-get install postgresql)")
        pytest.skip("PostgreSQL binaries not installed (apt-get install postgresql)")
    server = PgServer(bindir)
    server.init()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def oidc_provider() -> Any:
    """A real OpenID provider (npm's oidc-provider on node) for the session; skipped where node or the package
    is missing, except in CI, which installs them (scripts/dev.sh install)."""
    from tests.support.oidc_provider import OidcProvider, missing

    why = missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the OIDC provider cannot run in CI: {why}")
        pytest.skip(why)
    provider = OidcProvider()
    yield provider
    provider.stop()


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


@pytest.fixture
async def pg_proxy(pg_server: Any) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy("127.0.0.1", pg_server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return ensure_helm()
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"helm unavailable in CI: {exc}")
        pytest.skip(f"helm unavailable: {exc}")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A llama-server for the module's real-upstream tests (`tests/support/llama.py`)."""
    cache = cache_dir()
    if cache is None:
        if os.environ.get("SIDECAR_REAL_UPSTREAM") == "required":
            pytest.fail("llama-server is not built (bash scripts/real-upstream.sh build)")
        pytest.skip("llama-server is not built: run `bash scripts/real-upstream.sh build` (about 5-15 min)")
    server = LlamaServer(cache, tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Any]:
    """An OTLP/HTTP receiver that decodes the spans an exporter sends (`tests/support/otlp_receiver.py`)."""
    from tests.support.otlp_receiver import Receiver

    r = Receiver()
    await r.start()
    yield r
    await r.close()


@pytest.fixture
async def engine() -> AsyncIterator[Any]:
    """A fake engine that saturates as vLLM does (`tests/support/engine.py`): 4 at once, 10 ms a token."""
    from tests.support.engine import Engine, start

    e = Engine(capacity=4, token_s=0.01)
    runner = await start(e)
    yield e
    await runner.cleanup()
