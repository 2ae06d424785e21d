"""PostgreSQL through psycopg 3 with an async connection pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from sidecar.store.balances import USED
from sidecar.store.base import REQUEST_COLUMNS, Params, ReportTimeout, StoreError
from sidecar.store.schema import MIGRATIONS_TABLE, SCHEMA_V9_POSTGRES, migrations, statements
from sidecar.store.sql import SqlStore, json_array, request_row

_MIGRATION_LOCK = 0x51DECA2  # pg_advisory_lock key: one replica migrates at a time
MIGRATIONS = migrations("DOUBLE PRECISION", "BOOLEAN", "BIGSERIAL PRIMARY KEY", SCHEMA_V9_POSTGRES)


def _text(exc: BaseException) -> str:
    """An error in one line: psycopg's server errors go on with the statement and a caret on lines of their own."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_PASSING = (
    "starting up",
    "shutting down",
    "recovery",
    "accepting connections",  # a standby or a restore not yet consistent
    "terminating connection",
    "too many",
    "remaining connection slots",
)
# Errors about the database rather than the rows (a table not migrated yet, a grant missing): rows must wait
# for the operator, not be dead-lettered one by one.
_NOT_YET = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.InsufficientPrivilege)


# Rows stored, each charged to its key's budget balance for the period it started in: to this replica's holding
# of that balance (`limit_holders`: what it borrowed less what its stored rows used), or to the balance itself
# when it holds none (a row replayed from a journal after a restart). Only rows not stored yet are charged (all
# parts of one statement see one snapshot): a batch the journal replays is charged once. The INSERT is the main
# statement, so its reply is still `INSERT 0 n`.
_CHARGED = (
    "WITH batch AS (SELECT * FROM json_populate_recordset(NULL::request_log, %s::json)), "
    "fresh AS (SELECT DISTINCT ON (request_id) key_id, started_at, {used} AS used FROM batch "
    "WHERE key_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM request_log l WHERE l.request_id = batch.request_id) "
    "ORDER BY request_id), "
    "spent AS (SELECT b.key_id, b.bucket, SUM(fresh.used) AS used FROM fresh JOIN limit_balances b "
    "ON b.key_id = fresh.key_id AND b.dim = 'budget' AND fresh.started_at >= b.starts_at "
    "AND fresh.started_at < b.ends_at GROUP BY b.key_id, b.bucket), "
    "held AS (UPDATE limit_holders h SET outstanding = h.outstanding - spent.used FROM spent "
    "WHERE h.key_id = spent.key_id AND h.dim = 'budget' AND h.bucket = spent.bucket AND h.replica = %s "
    "RETURNING h.key_id, h.bucket), "
    "rest AS (UPDATE limit_balances b SET level = b.level - spent.used FROM spent "
    "WHERE b.key_id = spent.key_id AND b.dim = 'budget' AND b.bucket = spent.bucket "
    "AND NOT EXISTS (SELECT 1 FROM held WHERE held.key_id = spent.key_id AND held.bucket = spent.bucket)) "
    "INSERT INTO request_log ({cols}) SELECT {cols} FROM batch ON CONFLICT (request_id) DO NOTHING"
)


class PostgresStore(SqlStore):
    kind = "postgres"
    placeholder = "%s"
    db_now = "extract(epoch from clock_timestamp())::double precision"
    lock_key = "SELECT pg_advisory_xact_lock(hashtext(?))"  # one key's slot borrowers one at a time
    json_items = "SELECT json_array_elements_text(?::json)"
    migrations = MIGRATIONS

    def __init__(
        self,
        url: str,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        op_timeout: float = 10.0,
        report_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.report_timeout = report_timeout
        self._reports: AsyncConnectionPool | None = None  # report queries: a pool of their own (2 connections)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        # A network that goes silent (no RST, no FIN) would hold a statement for the TCP timeout, minutes to
        # hours; each operation gets this long instead (psycopg then cancels the query, for at most 10 s more).
        self.op_timeout = op_timeout
        self._pool: AsyncConnectionPool | None = None

    async def open(self) -> None:
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.connect_timeout,
            kwargs={"autocommit": True},
        )
        try:
            await self._pool.open(wait=True, timeout=self.connect_timeout)
        except (psycopg.Error, TimeoutError):
            await self._pool.close()
            self._pool = None
            why, lasting = await self._why_not()
            raise StoreError(f"cannot connect to PostgreSQL: {why}", transient=not lasting) from None
        # Report queries get a pool of their own (connected on first use), so key lookups and health checks
        # never wait for a connection behind them; the server stops their statements at the report timeout.
        self._reports = AsyncConnectionPool(
            self.url,
            min_size=0,
            max_size=2,
            open=False,
            timeout=self.connect_timeout,
            kwargs={"autocommit": True},
            configure=self._configure_report_connection,
        )
        await self._reports.open(wait=False)

    async def _why_not(self) -> tuple[str, bool]:
        """Why the pool could not connect, from one direct attempt: (reason, lasting). A server that answered
        with a refusal (FATAL: unknown role, bad password, no such database, pg_hba) will refuse again: the
        configuration is wrong. Anything else (refused, unreachable, starting up, full) may pass."""
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, connect_timeout=max(1, round(self.connect_timeout)))
        except psycopg.Error as exc:
            text = str(exc)
            fatal = (text.partition("FATAL:")[2].strip().splitlines() or [""])[0] if "FATAL:" in text else ""
            lasting = bool(fatal) and not any(word in fatal for word in _PASSING)
            return (f"the server refused: {fatal}" if fatal else type(exc).__name__), lasting
        await conn.close()
        return "PoolTimeout", False

    async def close(self) -> None:
        if self._reports is not None:
            await self._reports.close()
            self._reports = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise StoreError("store is not open")
        return self._pool

    async def migrate(self) -> int:
        """Migrate on one connection holding an advisory lock: replicas starting together on a new database
        would otherwise race to create the same tables (a unique violation in PostgreSQL's catalog) and all but
        one fail to start. Each version is one transaction, as in `SqlStore.migrate`."""
        try:
            async with asyncio.timeout(self.op_timeout * 3), self.pool.connection() as conn:
                await conn.execute(b"SELECT pg_advisory_lock(%s)", [_MIGRATION_LOCK])
                try:
                    await conn.execute(MIGRATIONS_TABLE.encode())
                    cur = await conn.execute(b"SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                    row = await cur.fetchone()
                    for version in range(int(row[0] if row else 0) + 1, len(self.migrations) + 1):
                        async with conn.transaction():
                            for statement in statements(self.migrations[version - 1]):
                                await conn.execute(statement.encode())
                            await conn.execute(
                                b"INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)",
                                [version, time.time()],
                            )
                finally:
                    await conn.execute(b"SELECT pg_advisory_unlock(%s)", [_MIGRATION_LOCK])
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(_text(exc)) from None
        return len(self.migrations)

    async def _has_migrations_table(self) -> bool:
        rows = await self._fetch("SELECT to_regclass('schema_migrations') IS NOT NULL")
        return bool(rows[0][0])

    def _day(self) -> str:
        return "to_char(to_timestamp(started_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def _bucket(self, seconds: int) -> str:
        return f"(FLOOR(started_at / {seconds}) * {seconds})::bigint"

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _reclaim(self, balance: tuple[str, str] | None = None) -> list[tuple[str, Params]]:
        """The expired holdings back to their balances in one statement: two replicas reclaiming at once each
        delete (and so return) a holding at most once, the second finding it gone."""
        one = "key_id = ? AND dim = 'budget' AND bucket = ? AND " if balance else ""
        sql = (
            f"WITH gone AS (DELETE FROM limit_holders WHERE {one}expires_at < {self.db_now} "
            "RETURNING key_id, dim, bucket, outstanding), "
            "back AS (SELECT key_id, dim, bucket, SUM(outstanding) AS amount FROM gone GROUP BY key_id, dim, bucket) "
            "UPDATE limit_balances b SET level = b.level + back.amount FROM back "
            "WHERE b.key_id = back.key_id AND b.dim = back.dim AND b.bucket = back.bucket"
        )
        return [(self._sql(sql), balance or ())]

    async def export_rows(self, position: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        # Transactions commit out of the order they began in, so `xact` alone could pass a row committed late;
        # below the snapshot's xmin every transaction has ended: nothing can still appear there.
        xact, _, request_id = (position or "-1 ").partition(" ")
        rows = await self._report(
            self._sql(
                f"SELECT xact, {', '.join(REQUEST_COLUMNS)} FROM request_log WHERE (xact, request_id) > (?, ?) "
                "AND xact < txid_snapshot_xmin(txid_current_snapshot()) ORDER BY xact, request_id LIMIT ?"
            ),
            (int(xact), request_id, limit),
        )
        return [request_row(r[1:]) for r in rows], (f"{rows[-1][0]} {rows[-1][1]}" if rows else position)

    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        try:
            async with asyncio.timeout(self.op_timeout), self.pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(sql.encode(), list(params))
                return list(await cur.fetchall())
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(_text(exc)) from None

    async def _execute(self, sql: str, params: Params = ()) -> int:
        try:
            async with asyncio.timeout(self.op_timeout), self.pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(sql.encode(), list(params))
                return max(cur.rowcount, 0)
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(_text(exc)) from None

    async def _configure_report_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # A SET, not the `options` startup parameter: that would replace any `options` in the store URL (a
        # search_path, say), and PgBouncer refuses it.
        await conn.execute(f"SET statement_timeout = {int(self.report_timeout * 1000)}".encode())

    async def _report(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        pool = self._reports
        if pool is None:
            raise StoreError("store is not open")
        try:
            async with asyncio.timeout(self.report_timeout + 1.0), pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(sql.encode(), list(params))
                return list(await cur.fetchall())
        except (psycopg.errors.QueryCanceled, TimeoutError):
            raise ReportTimeout(self.report_timeout) from None
        except psycopg.Error as exc:
            raise StoreError(_text(exc)) from None

    async def _run(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        try:
            async with (
                asyncio.timeout(self.op_timeout),
                self.pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                for sql, params in statements:
                    await cur.execute(sql.encode(), list(params))
                    rows = list(await cur.fetchall()) if cur.description else []
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(_text(exc)) from None
        return rows

    async def _insert_lines(self, table: str, columns: Sequence[str], lines: Sequence[bytes]) -> int:
        # One statement over a JSON array: PostgreSQL unpacks the rows, not Python.
        payload = json_array(lines)
        cols = ", ".join(columns)
        sql = (
            f"INSERT INTO {table} ({cols}) SELECT {cols} FROM json_populate_recordset(NULL::{table}, %s::json) "
            f"ON CONFLICT ({columns[0]}) DO NOTHING"
        )
        params: list[Any] = [payload]
        if table == "request_log":
            sql, params = _CHARGED.format(cols=cols, used=USED), [payload, self.replica]
        try:
            async with asyncio.timeout(self.op_timeout), self.pool.connection() as conn, conn.cursor() as cur:
                await cur.execute(sql.encode(), params)
                return max(cur.rowcount, 0)
        except _NOT_YET as exc:  # the schema or a grant is missing: not the rows' fault, they wait in the spool
            raise StoreError(_text(exc)) from None
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError, ValueError) as exc:
            raise StoreError(_text(exc), transient=False) from None
        except (psycopg.Error, TimeoutError) as exc:
            raise StoreError(_text(exc)) from None
