"""SqlStore: the queries both backends share, written once over four primitives each backend provides.

Placeholders are written `?` and rewritten to `%s` for PostgreSQL. The DDL and its migrations are written once
too, in `sidecar.store.schema`, in each backend's column types, which the backends pass in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from sidecar.store.balances import USED, Balances
from sidecar.store.base import (
    KEY_COLUMNS,
    REQUEST_COLUMNS,
    USAGE_FIELDS,
    USAGE_GROUPS,
    AdminEvent,
    KeyRow,
    Params,
    RequestQuery,
    StoreError,
)
from sidecar.store.schema import MIGRATIONS_TABLE, statements

AUDIT_COLUMNS = ("request_id", "key_id", "emitted_at", "record")
RETAINED = {"request_log": "started_at", "audit_records": "emitted_at"}  # tables under store.retention: time column


class SqlStore(Balances):
    kind = "sql"
    placeholder = "?"
    migrations: tuple[str, ...] = ()  # migration N is migrations[N-1]: statements separated by ";\n"

    # --- primitives each backend implements --------------------------------------------------------------
    async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def _run(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]:
        """Run statements in one transaction: all or nothing; the rows the last one returned."""
        raise NotImplementedError

    async def _report(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """A report query (usage, request and audit listings): on a connection of its own, so key lookups and
        health checks never queue behind it, and within the report timeout (`ReportTimeout`)."""
        return await self._fetch(sql, params)

    async def _execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement on its own; the number of rows it changed."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    # --- schema ----------------------------------------------------------------------------------------------
    async def migrate(self) -> int:
        await self._run([(MIGRATIONS_TABLE, ())])
        rows = await self._fetch("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        current = int(rows[0][0])
        for version in range(current + 1, len(self.migrations) + 1):
            steps: list[tuple[str, Params]] = [(sql, ()) for sql in statements(self.migrations[version - 1])]
            steps.append(
                (self._sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"), (version, time.time()))
            )
            await self._run(steps)
        return len(self.migrations)

    async def schema_version(self) -> int:
        """The schema version this store is at; 0 when it has none (never migrated: not a sidecar store)."""
        try:
            rows = await self._fetch("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        except StoreError:
            if await self._has_migrations_table():
                raise
            return 0
        return int(rows[0][0])

    async def _has_migrations_table(self) -> bool:
        raise NotImplementedError

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    # --- settings ----------------------------------------------------------------------------------------------
    async def get_setting(self, name: str) -> str | None:
        rows = await self._fetch(self._sql("SELECT value FROM settings WHERE name = ?"), (name,))
        return str(rows[0][0]) if rows else None

    async def put_setting(self, name: str, value: str, *, replace: bool) -> None:
        """Set `name`; unless `replace`, only when it has no value yet (the first of racing writers wins)."""
        conflict = "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at" if replace else "DO NOTHING"
        sql = f"INSERT INTO settings (name, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) {conflict}"
        await self._run([(self._sql(sql), (name, value, time.time()))])

    # --- keys --------------------------------------------------------------------------------------------------
    async def get_key(self, key_id: str) -> KeyRow | None:
        rows = await self._fetch(self._sql(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys WHERE id = ?"), (key_id,))
        return _key(rows[0]) if rows else None

    async def list_keys(self) -> list[KeyRow]:
        rows = await self._fetch(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY created_at, id")
        return [_key(r) for r in rows]

    async def save_key(self, key: KeyRow, event: AdminEvent, *, create: bool) -> None:
        values = [getattr(key, c) for c in KEY_COLUMNS]
        values[KEY_COLUMNS.index("models")] = None if key.models is None else orjson.dumps(list(key.models)).decode()
        if create:
            cols = ", ".join(KEY_COLUMNS)
            change = (self._sql(f"INSERT INTO api_keys ({cols}) VALUES ({', '.join('?' * len(KEY_COLUMNS))})"), values)
        else:
            sets = ", ".join(f"{c} = ?" for c in KEY_COLUMNS[1:])
            change = (self._sql(f"UPDATE api_keys SET {sets} WHERE id = ?"), [*values[1:], key.id])
        audit = (
            self._sql(
                "INSERT INTO admin_audit_log (at, actor, action, target, changes, request_id) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (event.at, event.actor, event.action, event.target, orjson.dumps(event.changes).decode(), event.request_id),
        )
        await self._run([change, audit])

    async def admin_events(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE id < ?", [before]) if before is not None else ("", [])
        rows = await self._fetch(
            self._sql(
                f"SELECT id, at, actor, action, target, changes, request_id FROM admin_audit_log {where} "
                "ORDER BY id DESC LIMIT ?"
            ),
            [*params, limit],
        )
        names = ("id", "at", "actor", "action", "target", "changes", "request_id")
        out = [dict(zip(names, r, strict=True)) for r in rows]
        for row in out:
            row["changes"] = orjson.loads(row["changes"])
        return out

    # --- request log -------------------------------------------------------------------------------------
    async def insert_requests(self, lines: Sequence[bytes]) -> int:
        """Insert JSON-encoded rows (one object per line) in one statement; duplicates are skipped."""
        return await self._insert_lines("request_log", REQUEST_COLUMNS, lines)

    async def _insert_lines(self, table: str, columns: Sequence[str], lines: Sequence[bytes]) -> int:
        """Insert JSON-encoded rows, skipping existing keys (`ON CONFLICT DO NOTHING`); rows inserted."""
        raise NotImplementedError

    async def tokens_since(self, key_id: str, since: float) -> int:
        """Tokens a key's requests used since `since` (its budget spent so far in a period: the CLI's figure)."""
        rows = await self._report(
            self._sql(f"SELECT COALESCE(SUM({USED}), 0) FROM request_log WHERE key_id = ? AND started_at >= ?"),
            (key_id, since),
        )
        return int(rows[0][0])

    async def count_requests(self) -> int:
        return int((await self._fetch("SELECT COUNT(*) FROM request_log"))[0][0])

    async def requests(self, query: RequestQuery) -> list[dict[str, Any]]:
        where, params = _filters(query, "request_log")
        rows = await self._report(
            self._sql(
                f"SELECT {', '.join(REQUEST_COLUMNS)} FROM request_log {where} "
                "ORDER BY started_at DESC, request_id DESC LIMIT ?"
            ),
            [*params, query.limit],
        )
        return [request_row(r) for r in rows]

    async def requests_after(
        self, since: float, until: float | None, after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Rows that started in [since, until), oldest first, after `after` (the (started_at, request_id) of the
        last row of the page before): `sidecar usage export`'s pages, on the report connection."""
        where, params = _filters(RequestQuery(since=since, until=until), "request_log")
        if after is not None:
            where += " AND (started_at > ? OR (started_at = ? AND request_id > ?))"
            params.extend([after[0], after[0], after[1]])
        rows = await self._report(
            self._sql(
                f"SELECT {', '.join(REQUEST_COLUMNS)} FROM request_log {where} ORDER BY started_at, request_id LIMIT ?"
            ),
            [*params, limit],
        )
        return [request_row(r) for r in rows]

    # --- usage export: rows after a cursor, the cursor under a lease (sidecar/records/export.py) -----------
    async def export_rows(self, position: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        """Up to `limit` rows stored after cursor `position` ("": the first row stored), in cursor order, and the
        position of the last one (`position` itself when there is none). On the report connection."""
        raise NotImplementedError

    async def export_claim(self, name: str, holder: str, lease: float) -> str | None:
        """Hold (or go on holding) export cursor `name` for `lease` seconds of the store's clock: its position, or
        None while another holder's lease runs. A cursor nobody took yet starts at "" (the first row)."""
        now = self.db_now
        statements: list[tuple[str, Params]] = [
            (
                self._sql(
                    "INSERT INTO export_cursors (name, position, updated_at) "
                    f"VALUES (?, '', {now}) ON CONFLICT (name) DO NOTHING"
                ),
                (name,),
            ),
            (
                self._sql(
                    f"UPDATE export_cursors SET holder = ?, lease_until = {now} + ? "
                    f"WHERE name = ? AND (holder = ? OR holder IS NULL OR lease_until < {now})"
                ),
                (holder, lease, name, holder),
            ),
            (self._sql("SELECT position, holder FROM export_cursors WHERE name = ?"), (name,)),
        ]
        rows = await self._run(statements)
        return str(rows[0][0]) if rows and rows[0][1] == holder else None

    async def export_advance(self, name: str, holder: str, old: str, new: str, lease: float) -> bool:
        """Move cursor `name` from `old` to `new` if `holder` still holds it there (a compare-and-set: a holder
        whose lease another replica took over cannot move it back); False when it did not."""
        now = self.db_now
        return (
            await self._execute(
                self._sql(
                    f"UPDATE export_cursors SET position = ?, lease_until = {now} + ?, updated_at = {now} "
                    "WHERE name = ? AND holder = ? AND position = ?"
                ),
                (new, lease, name, holder, old),
            )
            > 0
        )

    async def export_release(self, name: str, holder: str) -> None:
        """Let go of cursor `name` (a replica stopping): another replica takes it at once, not after the lease."""
        await self._execute(
            self._sql("UPDATE export_cursors SET holder = NULL, lease_until = NULL WHERE name = ? AND holder = ?"),
            (name, holder),
        )

    def _day(self) -> str:
        raise NotImplementedError

    async def usage(
        self, since: float, by: str, key_id: str | None = None, until: float | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        if by not in USAGE_GROUPS:
            raise StoreError(f"unknown grouping {by!r}")
        group = {"key": "key_id", "model": "model", "day": self._day()}[by]
        where, params = _filters(RequestQuery(key_id=key_id, since=since, until=until, model=model), "request_log")
        rows = await self._report(
            self._sql(
                f"SELECT {group} AS grp, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
                "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cached_tokens), 0), "
                "COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(reasoning_tokens), 0), "
                "SUM(CASE WHEN outcome = 'completed' THEN 0 ELSE 1 END) "
                f"FROM request_log {where} GROUP BY grp ORDER BY grp"
            ),
            params,
        )
        names = (by, *USAGE_FIELDS)
        return [dict(zip(names, (r[0], *map(int, r[1:])), strict=True)) for r in rows]

    def _bucket(self, seconds: int) -> str:
        raise NotImplementedError

    async def usage_series(
        self, since: float, until: float | None, seconds: int, split: str, key_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests and tokens per time bucket (`seconds` long, aligned to the epoch) and per key, model or
        outcome (`split`): what the console draws. On the report connection, like `usage`."""
        column = {"key": "key_id", "model": "model", "outcome": "outcome"}.get(split)
        if column is None or seconds not in (3600, 86400):
            raise StoreError(f"unknown series {split!r}/{seconds}")
        where, params = _filters(RequestQuery(key_id=key_id, since=since, until=until), "request_log")
        rows = await self._report(
            self._sql(
                f"SELECT {self._bucket(seconds)} AS t, {column} AS grp, COUNT(*), COALESCE(SUM(total_tokens), 0) "
                f"FROM request_log {where} GROUP BY t, grp ORDER BY t, grp"
            ),
            params,
        )
        return [{"t": int(r[0]), split: r[1], "requests": int(r[2]), "total_tokens": int(r[3])} for r in rows]

    async def delete_older(self, table: str, cutoff: float, limit: int) -> int:
        """Delete up to `limit` of the oldest rows of `request_log` or `audit_records` from before `cutoff`."""
        column = RETAINED[table]
        return await self._execute(
            self._sql(
                f"DELETE FROM {table} WHERE request_id IN "
                f"(SELECT request_id FROM {table} WHERE {column} < ? ORDER BY {column} LIMIT ?)"
            ),
            (cutoff, limit),
        )

    # --- audit records -----------------------------------------------------------------------------------
    async def insert_audit(self, lines: Sequence[bytes]) -> int:
        return await self._insert_lines("audit_records", AUDIT_COLUMNS, lines)

    async def audit_records(self, query: RequestQuery) -> list[dict[str, Any]]:
        where, params = _filters(query, "audit_records")
        rows = await self._report(
            self._sql(f"SELECT record FROM audit_records {where} ORDER BY emitted_at DESC, request_id DESC LIMIT ?"),
            [*params, query.limit],
        )
        return [orjson.loads(r[0]) for r in rows]


def json_array(lines: Sequence[bytes]) -> str:
    return (b"[" + b",".join(lines) + b"]").decode()


def _filters(q: RequestQuery, table: str) -> tuple[str, list[Any]]:
    """The WHERE clause of a listing of `request_log` or `audit_records` (which has no outcome column)."""
    time_col = RETAINED[table]
    clauses: list[str] = []
    params: list[Any] = []
    if q.request_id is not None:
        clauses.append("request_id = ?")
        params.append(q.request_id)
    if q.key_id is not None:
        clauses.append("key_id = ?")
        params.append(q.key_id)
    if q.outcome is not None and table == "request_log":
        clauses.append("outcome = ?")
        params.append(q.outcome)
    if q.model is not None and table == "request_log":
        clauses.append("model = ?")
        params.append(q.model)
    if q.since is not None:
        clauses.append(f"{time_col} >= ?")
        params.append(q.since)
    if q.until is not None:
        clauses.append(f"{time_col} < ?")
        params.append(q.until)
    if q.before is not None:
        clauses.append(f"({time_col} < ? OR ({time_col} = ? AND request_id < ?))")
        params.extend([q.before[0], q.before[0], q.before[1]])
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def request_row(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(REQUEST_COLUMNS, values, strict=True))
    row["stream"] = bool(row["stream"])
    return row


def _key(row: Sequence[Any]) -> KeyRow:
    data = dict(zip(KEY_COLUMNS, row, strict=True))
    models = data.pop("models")
    return KeyRow(**data, models=None if models is None else tuple(orjson.loads(models)))
