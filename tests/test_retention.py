"""Bounded disk: rows past `store.retention` are deleted in the background (both stores), and a flood of
unauthenticated requests costs counters, not a row, a journal entry and a log line each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson

from sidecar.app import STORE, WRITER
from sidecar.records import RequestRecord
from sidecar.retention import Retention
from sidecar.store import open_store
from sidecar.store.base import RequestQuery
from tests.conftest import wait_for

DAY = 86400.0


def _row(age_days: float) -> bytes:
    rec = RequestRecord.start("POST", "/v1/chat/completions")
    rec.status = 200
    rec.finish()
    rec.started_at -= age_days * DAY
    rec.finished_at -= age_days * DAY
    return orjson.dumps(rec.as_row())


def _audit(age_days: float, n: int) -> bytes:
    at = time.time() - age_days * DAY
    return orjson.dumps({"request_id": f"req_audit_{age_days}_{n}", "key_id": None, "emitted_at": at, "record": "{}"})


async def test_sweep_deletes_only_rows_past_retention_in_batches(store_url):
    store = open_store(store_url)
    await store.open()
    await store.migrate()
    old = [_row(91 + i / 1000) for i in range(2500)]  # more than two batches
    new = [_row(89) for _ in range(10)] + [_row(0) for _ in range(10)]
    await store.insert_requests(old + new)
    await store.insert_audit([_audit(100, i) for i in range(5)] + [_audit(1, i) for i in range(3)])
    retention = Retention(store, 90 * DAY, 600.0)
    assert await retention.sweep() == 2505
    assert await store.count_requests() == 20
    assert len(await store.audit_records(RequestQuery(limit=100))) == 3
    assert retention.deleted == {"request_log": 2500, "audit_records": 5}
    assert await retention.sweep() == 0
    await store.close()


async def test_the_sidecar_sweeps_in_the_background(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, store__retention="30d", store__retention_interval=0.2)
    store = running.server.app[STORE]
    await store.insert_requests([_row(31), _row(31), _row(29)])
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while await store.count_requests() != 1:
        assert loop.time() < end, "old rows were not deleted"
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        assert 'sidecar_retention_deleted_rows_total{table="request_log"} 2.0' in await r.text()


async def _pipelined(port: int, request: bytes, n: int) -> int:
    """Send `n` requests on one connection at once (HTTP/1.1 pipelining); the number of 401s that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request * n)
    await writer.drain()
    seen = b""
    count = 0
    while count < n:
        data = await asyncio.wait_for(reader.read(1 << 20), 30)
        if not data:
            break
        seen = seen[-32:] + data
        count += data.count(b"HTTP/1.1 401")
    writer.close()
    await writer.wait_closed()
    return count


async def test_a_flood_of_bad_keys_grows_nothing_without_bound(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True)
    bad = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-sc-not-a-real-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    counts = await asyncio.gather(*(_pipelined(running.port, bad, 1000) for _ in range(20)))
    assert sum(counts) == 20_000
    writer = running.server.app[WRITER]
    await wait_for(lambda: writer.queued() == 0, 5)
    stored = await running.stored()
    lines = running.rows
    spool = Path(running.server.settings.server.data_dir, "spool")
    journal = sum(p.stat().st_size for p in spool.glob("requests.*.jsonl"))
    print(f"20,000 bad-key requests: {len(stored)} rows, {len(lines)} log lines, journal {journal} bytes")
    assert len(stored) <= 70 and len(lines) <= 70  # 60 a minute from one address, and a little refill
    assert all(r["status"] == 401 and r["outcome"] == "unauthorized" for r in stored)
    assert journal < 70 * 1000
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        text = await r.text()
    recorded = next(
        line for line in text.splitlines() if line.startswith('sidecar_unauthenticated_rejects_total{recorded="true"')
    )
    skipped = next(
        line for line in text.splitlines() if line.startswith('sidecar_unauthenticated_rejects_total{recorded="false"')
    )
    assert float(recorded.split()[-1]) + float(skipped.split()[-1]) == 20_000
    assert 'sidecar_requests_total{code="401"' in text
    await running.server.runner.cleanup()  # the shutdown summary line
    assert "rejected without a row" in running.log_text()
