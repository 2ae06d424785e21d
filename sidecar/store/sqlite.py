"""SQLite through aiosqlite: the embedded default. WAL, busy_timeout, synchronous=NORMAL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from sidecar.store.base import REQUEST_COLUMNS, Params, ReportTimeout, StoreError
from sidecar.store.schema import SCHEMA_V9_SQLITE, migrations
from sidecar.store.sql import RETAINED, SqlStore, request_row

_TX_ROWS = 100  # rows per transaction: ~0.7 ms of the loop; 25 cost 2 µs more per row, 400 stalls 2.5 ms
_CHECKPOINT_ROWS = 5000
_NESTED = (dict, list)  # a tuple: `dict | list` in isinstance builds a union object on every call
_LOCKED_WAITS = (0.002, 0.005, 0.01, 0.02, 0.05)  # seconds between tries of a write another process holds locked


def _values(line: bytes, columns: Sequence[str]) -> tuple[Any, ...]:
    """A row's column values; a row that is not an object, or a value SQLite cannot bind (an object, an
    array), is the row's fault: TypeError, so that it is refused alone instead of stalling the writer."""
    row = orjson.loads(line)
    if not isinstance(row, dict):
        raise TypeError(f"a row is a JSON object, not {type(row).__name__}")
    values = tuple(map(row.get, columns))
    # A nested value needs a `{` or `[` past the row's own brace: a line without one is checked in two scans of
    # bytes instead of a type check of every value (a row's costliest step here).
    if (line.find(b"{", 1) >= 0 or b"[" in line) and any(isinstance(v, _NESTED) for v in values):
        raise TypeError("a column value is an object or an array")
    return values


MIGRATIONS = migrations("REAL", "INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT", SCHEMA_V9_SQLITE)
_USED_NEW = "COALESCE(NEW.total_tokens, COALESCE(NEW.prompt_tokens, 0) + COALESCE(NEW.completion_tokens, 0))"  # USED
# Each row the writer stores is charged to its key's budget balance for the period it started in: to this
# replica's holding of it (what it borrowed less what its stored rows used), or to the balance itself when it
# holds none (a row replayed from the journal after a restart). A TEMP trigger: on the writer's connection
# only, where this process's rows are inserted, and it fires only for rows inserted (a replayed duplicate is
# skipped by ON CONFLICT, and charged once). A key without a budget has no balance to charge: one probe of the
# balances' primary key says so, where the two updates cost a row 3.5 µs (twice the probe) to change nothing.
_CHARGE_TRIGGER = """CREATE TEMP TRIGGER IF NOT EXISTS charge_budgets AFTER INSERT ON main.request_log
WHEN NEW.key_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM limit_balances WHERE key_id = NEW.key_id AND dim = 'budget') BEGIN
UPDATE limit_holders SET outstanding = outstanding - ({used}) WHERE replica = '{replica}' AND dim = 'budget'
  AND key_id = NEW.key_id AND bucket IN (SELECT bucket FROM limit_balances b WHERE b.key_id = NEW.key_id
  AND b.dim = 'budget' AND NEW.started_at >= b.starts_at AND NEW.started_at < b.ends_at);
UPDATE limit_balances SET level = level - ({used}) WHERE key_id = NEW.key_id AND dim = 'budget'
  AND NEW.started_at >= starts_at AND NEW.started_at < ends_at AND NOT EXISTS (SELECT 1 FROM limit_holders h
  WHERE h.key_id = NEW.key_id AND h.dim = 'budget' AND h.bucket = limit_balances.bucket AND h.replica = '{replica}');
END"""


async def _taking_turns(tx: Callable[[], int]) -> int:
    """One write transaction of the writer's connection (which never waits for SQLite's lock on the loop); when
    another process holds the lock (a worker's write, a CLI's), tried again after a brief wait off the loop
    rather than called an outage (log lines, spool, backoff). A lock held longer than `_LOCKED_WAITS` is one."""
    for wait in _LOCKED_WAITS:
        try:
            return tx()
        except StoreError as exc:
            if not exc.transient or "locked" not in str(exc):
                raise
        await asyncio.sleep(wait)
    return tx()


class SqliteStore(SqlStore):
    kind = "sqlite"
    placeholder = "?"
    db_now = "((julianday('now') - 2440587.5) * 86400.0)"
    json_items = "SELECT value FROM json_each(?)"
    migrations = MIGRATIONS

    def __init__(self, path: str, busy_timeout_ms: int = 5000, report_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.report_timeout = report_timeout
        self._db: aiosqlite.Connection | None = None
        self._reports: aiosqlite.Connection | None = None  # a second connection (and thread) for report queries
        self._report_lock = asyncio.Lock()
        # One transaction at a time on the main connection: two callers' BEGINs on one connection would meet
        # ("cannot start a transaction within a transaction"), e.g. borrows for two keys at once.
        self._tx_lock = asyncio.Lock()
        self._w: sqlite3.Connection | None = None
        self._since_checkpoint = 0

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not os.path.exists(self.path)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                f"busy_timeout={self.busy_timeout_ms}",
                "foreign_keys=ON",
            ):
                await self._db.execute(f"PRAGMA {pragma}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self.path}: {exc}") from None
        if fresh:
            os.chmod(self.path, 0o600)  # usage and key hashes: not for other local users
        try:  # a second connection, with a thread of its own, for report queries
            self._reports = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reports.execute("PRAGMA query_only=ON")
            await self._reports.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {self.path}: {exc}") from None

    async def close(self) -> None:
        if self._reports is not None:
            await self._reports.close()
            self._reports = None
        if self._w is not None:
            self._w.close()
            self._w = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def _has_migrations_table(self) -> bool:
        rows = await self._fetch("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
        return bool(rows)

    def _day(self) -> str:
        return "strftime('%Y-%m-%d', started_at, 'unixepoch')"

    def _bucket(self, seconds: int) -> str:
        return f"((CAST(started_at AS INTEGER) / {seconds}) * {seconds})"

    async def export_rows(self, position: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        # `seq` is taken under the one write lock, so in commit order: past the cursor is everything after it.
        rows = await self._report(
            f"SELECT seq, {', '.join(REQUEST_COLUMNS)} FROM request_log WHERE seq > ? ORDER BY seq LIMIT ?",
            (int(position or 0), limit),
        )
        return [request_row(r[1:]) for r in rows], (str(rows[-1][0]) if rows else position)

    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        try:
            async with self.db.execute(sql, params) as cur:
                return [tuple(r) for r in await cur.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _report(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        db = self._reports
        if db is None:
            raise StoreError("store is not open")
        running = False
        try:
            async with asyncio.timeout(self.report_timeout):
                # One at a time, so that a timeout interrupts this query and not another one.
                async with self._report_lock:
                    running = True
                    async with db.execute(sql, params) as cur:
                        return [tuple(r) for r in await cur.fetchall()]
        except TimeoutError:
            if running:
                await db.interrupt()  # thread-safe: the query stops where it is, and the connection is free again
            raise ReportTimeout(self.report_timeout) from None
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _execute(self, sql: str, params: Params = ()) -> int:
        try:
            async with self._tx_lock, self.db.execute(sql, params) as cur:  # never inside another's transaction
                return max(cur.rowcount, 0)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _run(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]:
        # Shielded: a caller cancelled (its client left) while BEGIN waited for the write lock would leave the
        # BEGIN to finish in aiosqlite's thread and the transaction open, holding the lock for every process.
        return await asyncio.shield(asyncio.ensure_future(self._serialised(statements)))

    async def _serialised(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]:
        async with self._tx_lock:
            return await self._transaction(statements)

    async def _transaction(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]:
        db = self.db
        rows: list[tuple[Any, ...]] = []
        try:
            await db.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                for sql, params in statements:
                    async with db.execute(sql, params) as cur:
                        rows = [tuple(r) for r in await cur.fetchall()]
                await db.execute("COMMIT")
                committed = True
            finally:
                if not committed:  # a failed statement (e.g. the audit row) undoes the whole change
                    await db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None
        return rows

    async def _insert_lines(self, table: str, columns: Sequence[str], lines: Sequence[bytes]) -> int:
        """Batched inserts on a synchronous connection of the event loop's own, in short transactions.

        Through aiosqlite's thread, `executemany` takes the GIL back once per row and queues behind a busy
        event loop every time (a GIL convoy: ~0.5 ms per row under load). Here a transaction of 100 rows
        takes under a millisecond of the loop. The connection never waits for a lock (busy_timeout=0):
        a locked database is a transient error and the rows stay in the spool. It never checkpoints either:
        the WAL is checkpointed from aiosqlite's thread, so no fsync ever runs on the loop.
        """
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT ({columns[0]}) DO NOTHING"
        )
        try:
            params = [_values(line, columns) for line in lines]
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise StoreError(f"malformed row: {exc}", transient=False) from None
        db = self._writer()
        inserted = 0
        for i in range(0, len(params), _TX_ROWS):
            try:
                inserted += await _taking_turns(partial(self._insert_tx, db, sql, params[i : i + _TX_ROWS]))
            except StoreError as exc:
                exc.written = inserted  # committed already: a retry of the batch finds them present
                raise
            await asyncio.sleep(0)  # let requests through between transactions
        self._since_checkpoint += inserted
        if self._since_checkpoint >= _CHECKPOINT_ROWS:
            self._since_checkpoint = 0
            await self._fetch("PRAGMA wal_checkpoint(PASSIVE)")
        return inserted

    async def delete_older(self, table: str, cutoff: float, limit: int) -> int:
        """Retention on SQLite: on the writer's own connection, in transactions of `_TX_ROWS` rows, like inserts.

        On the main connection a delete would hold SQLite's one write lock while the writer's inserts (which never
        wait for it) fail and spool; here the two simply take turns on the event loop, about a millisecond each.
        """
        column = RETAINED[table]
        sql = (
            f"DELETE FROM {table} WHERE request_id IN "
            f"(SELECT request_id FROM {table} WHERE {column} < ? ORDER BY {column} LIMIT ?)"
        )
        db = self._writer()
        deleted = 0
        while deleted < limit:
            n = await _taking_turns(partial(self._delete_tx, db, sql, (cutoff, min(_TX_ROWS, limit - deleted))))
            deleted += n
            if n < _TX_ROWS:
                break
            await asyncio.sleep(0)
        return deleted

    @staticmethod
    def _delete_tx(db: sqlite3.Connection, sql: str, params: tuple[float, int]) -> int:
        try:
            db.execute("BEGIN IMMEDIATE")
            committed = False
            try:
                n = db.execute(sql, params).rowcount
                db.execute("COMMIT")
                committed = True
            finally:
                if not committed and db.in_transaction:
                    db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None
        return max(n, 0)

    @staticmethod
    def _insert_tx(db: sqlite3.Connection, sql: str, params: list[tuple[Any, ...]]) -> int:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None  # locked or busy: worth retrying
        try:
            before = db.total_changes
            db.executemany(sql, params)
            inserted = db.total_changes - before
            db.execute("COMMIT")
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError, OverflowError) as exc:
            db.execute("ROLLBACK")
            raise StoreError(f"{type(exc).__name__}: {exc}", transient=False) from None
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(str(exc)) from None
        return inserted

    def _writer(self) -> sqlite3.Connection:
        if self._w is None:
            try:
                self._w = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                for pragma in ("busy_timeout=0", "synchronous=NORMAL", "wal_autocheckpoint=0"):
                    self._w.execute(f"PRAGMA {pragma}")
                self._w.execute(_CHARGE_TRIGGER.format(replica=self.replica, used=_USED_NEW))
            except sqlite3.Error as exc:
                if self._w is not None:
                    self._w.close()
                self._w = None
                raise StoreError(f"cannot open SQLite database {self.path}: {exc}") from None
        return self._w
