"""Stores opened directly by a test: `opened` (migrated), `refuse_poison` (a store that refuses some rows) and
`rows` (finished records as the writer gets them)."""

from __future__ import annotations

import sqlite3
from typing import Any

from sidecar.records.record import RequestRecord
from sidecar.store import open_store


def rows(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        rec = RequestRecord.start("POST", "/v1/chat/completions")
        rec.status, rec.model = 200, f"m{i}"
        out.append(rec.finish().as_row())
    return out


async def opened(url: str) -> Any:
    store = open_store(url)
    await store.open()
    await store.migrate()
    return store


async def refuse_poison(store_url: str) -> None:
    """The store itself refuses rows whose model is 'poison': a SQLite trigger, a PostgreSQL CHECK constraint.
    Nothing in the row is malformed, so sanitising cannot save it."""
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            db.execute(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON request_log WHEN NEW.model = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'poison refused'); END"
            )
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as conn:
            await conn.execute("ALTER TABLE request_log ADD CONSTRAINT no_poison CHECK (model <> 'poison')")
