"""The usage export's throughput: a store holding N request rows (default 100,000), exported by one
`sidecar.records.export.Exporter` from an empty cursor into bench/events_sink.py (its own process) until the
receiver holds every row; rows/s = N / that time. SQLite, and PostgreSQL when a throwaway server can be started
(tests/support/postgres.py, as the suite does).

    PYTHONPATH=. .venv/bin/python bench/export_bench.py --rows 100000 --batch-size 500
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

from sidecar.config import ExportCfg
from sidecar.records.export import Exporter
from sidecar.records.record import RequestRecord
from sidecar.store import open_store

BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rec = RequestRecord.start("POST", "/v1/chat/completions")
        rec.status, rec.model, rec.key_id = 200, "bench-model", f"k{i % 50}"
        rec.prompt_tokens, rec.completion_tokens, rec.total_tokens = 120, 30, 150
        out.append(orjson.dumps(rec.finish().as_row()))
    return out


def received(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
        return int(json.loads(r.read())["events"])


async def run(url: str, n: int, batch_size: int, sink: int) -> float:
    store = open_store(url)
    await store.open()
    await store.migrate()
    rows = lines(n)
    for i in range(0, n, 5000):
        await store.insert_requests(rows[i : i + 5000])
    before = received(sink)
    cfg = ExportCfg(url=f"http://127.0.0.1:{sink}/api/v1/events", batch_size=batch_size, interval=0.05)
    exporter = Exporter(store, cfg, "")
    start = time.perf_counter()
    await exporter.start()
    while exporter.exported < n:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - start
    await exporter.close()
    await store.close()
    assert received(sink) - before == n
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=500)
    a = ap.parse_args()
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(BENCH / "events_sink.py"), "--port", str(port)])
    try:
        time.sleep(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"sqlite": f"sqlite:///{tmp}/bench.db"}
            pg = None
            try:
                sys.path.insert(0, str(BENCH.parent))
                from tests.support.postgres import PgServer, find_bin

                bindir = find_bin()
                if bindir:
                    pg = PgServer(bindir)
                    pg.init()
                    stores["postgres"] = pg.create_db("export_bench")
            except Exception as exc:  # no PostgreSQL here: SQLite alone
                print(f"postgres skipped: {exc}", file=sys.stderr)
            try:
                for name, url in stores.items():
                    elapsed = asyncio.run(run(url, a.rows, a.batch_size, port))
                    rate = a.rows / elapsed
                    print(f"{name}: {a.rows} rows, batch {a.batch_size}: {elapsed:.2f} s, {rate:,.0f} rows/s")
            finally:
                if pg is not None:
                    pg.destroy()
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    main()
