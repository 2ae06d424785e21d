"""Stores: the `Store` protocol (base.py) and its SQLite and PostgreSQL implementations."""

from __future__ import annotations

from sidecar.store.base import Store


def open_store(url: str, pool_size: int = 4, op_timeout: float = 10.0, report_timeout: float = 10.0) -> Store:
    """A store for `sqlite:///PATH` or `postgresql://...` (not yet connected: call `await store.open()`)."""
    if url.startswith("sqlite:///"):
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///") :], report_timeout=report_timeout)
    from sidecar.store.postgres import PostgresStore

    return PostgresStore(url, pool_size, op_timeout=op_timeout, report_timeout=report_timeout)
