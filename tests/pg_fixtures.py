"""PostgreSQL for the session: a throwaway server (tests/pg.py), a fresh database per test, and `store_url`, which
runs a store test against SQLite and PostgreSQL both."""

from __future__ import annotations

import os
from typing import Any

import pytest


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
