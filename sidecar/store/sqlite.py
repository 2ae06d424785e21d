"""SQLite through aiosqlite: the embedded default. WAL, busy_timeout, synchronous=NORMAL."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from sidecar.store.base import StoreError
from sidecar.store.sql import Params, SqlStore, schema_v1

MIGRATIONS = (schema_v1("REAL", "INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT"),)


class SqliteStore(SqlStore):
    kind = "sqlite"
    placeholder = "?"
    migrations = MIGRATIONS

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
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

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def _day(self) -> str:
        return "strftime('%Y-%m-%d', started_at, 'unixepoch')"

    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        try:
            async with self.db.execute(sql, params) as cur:
                return [tuple(r) for r in await cur.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _run(self, statements: Sequence[tuple[str, Params]]) -> None:
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    await db.execute(sql, params)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    async def _many(self, sql: str, rows: Sequence[Params]) -> int:
        db = self.db
        try:
            return await self._many_tx(db, sql, rows)
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError, OverflowError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}", transient=False) from None
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from None

    @staticmethod
    async def _many_tx(db: aiosqlite.Connection, sql: str, rows: Sequence[Params]) -> int:
        await db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            await db.executemany(sql, rows)
            inserted = db.total_changes - before
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
        return inserted

    async def integrity_check(self) -> str:
        return str((await self._fetch("PRAGMA integrity_check"))[0][0])
