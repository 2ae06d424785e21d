"""Writer throughput alone: rows/s from put() to committed rows, SQLite and (if available) PostgreSQL.

    .venv/bin/python bench/writer_bench.py [--rows 200000] [--pg]

With --pg a throwaway PostgreSQL server is started the same way the tests do (tests/support/postgres.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.config import WriterCfg
from sidecar.records.record import RequestRecord
from sidecar.records.writer import BatchWriter
from sidecar.store import open_store


def make_rows(n: int) -> list[dict[str, object]]:
    rows = []
    for _ in range(n):
        rec = RequestRecord.start("POST", "/v1/chat/completions")
        rec.status, rec.model, rec.key_id = 200, "llama", "abcdefghijkl"
        rec.set_usage(120, 64, None, "upstream")
        rows.append(rec.finish().as_row())
    return rows


async def run(url: str, rows: list[dict[str, object]], spool: bool) -> float:
    store = open_store(url, pool_size=4)
    await store.open()
    await store.migrate()
    with tempfile.TemporaryDirectory() as spool_dir:
        writer = BatchWriter(store, WriterCfg(max_rows=1000, flush_interval_ms=50, spool=spool), spool_dir)
        await writer.start()
        started = time.perf_counter()
        for i, row in enumerate(rows):
            writer.put(row)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the flusher run, as the event loop would between requests
        await writer.close()
        elapsed = time.perf_counter() - started
    assert await store.count_requests() == len(rows), "rows lost"
    await store.close()
    return len(rows) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)  # under the default queue bound (no spool: drops)
    ap.add_argument("--pg", action="store_true")
    a = ap.parse_args()
    rows = make_rows(a.rows)
    with tempfile.TemporaryDirectory() as d:
        for spool in (False, True):
            rate = asyncio.run(run(f"sqlite:///{d}/w{int(spool)}.db", rows, spool))
            print(f"sqlite   spool={spool!s:5}  {rate:10.0f} rows/s  ({a.rows} rows)")
    if a.pg:
        from tests.support.postgres import PgServer, find_bin

        bindir = find_bin()
        if bindir is None:
            print("postgres: binaries not installed")
            return
        server = PgServer(bindir)
        server.init()
        try:
            for spool in (False, True):
                url = server.create_db(f"w{int(spool)}")
                rate = asyncio.run(run(url, rows, spool))
                print(f"postgres spool={spool!s:5}  {rate:10.0f} rows/s  ({a.rows} rows)")
        finally:
            server.destroy()


if __name__ == "__main__":
    main()
