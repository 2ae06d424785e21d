"""Store: where rows, keys, audit records and the shared limits' balances live. `base.Store` is the protocol
(and its rows and errors), `open_store` picks `sqlite.SqliteStore` (embedded, the default) or
`postgres.PostgresStore` (shared by replicas) by URL, both over `sql.SqlStore` (each query written once, the
DDL and its migrations in `schema`, the shared limits' statements in `balances`); `opener.Opener` opens it in
the background and retries. Its face: `base`, `opener`, `open_store`.
"""

from __future__ import annotations

from sidecar.store.base import Store

__all__ = ["base", "open_store", "opener"]


def open_store(url: str, pool_size: int = 4, op_timeout: float = 10.0, report_timeout: float = 10.0) -> Store:
    """A store for `sqlite:///PATH` or `postgresql://...` (not yet connected: call `await store.open()`)."""
    if url.startswith("sqlite:///"):
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(url[len("sqlite:///") :], report_timeout=report_timeout)
    from sidecar.store.postgres import PostgresStore

    return PostgresStore(url, pool_size, op_timeout=op_timeout, report_timeout=report_timeout)
