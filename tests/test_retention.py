"""Bounded disk: rows past `store.retention` are deleted in the background (both stores), and a flood of
unauthenticated requests costs counters, not a row, a journal entry and a log line each."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import aiohttp
import orjson

from sidecar.app import STORE, WRITER
from sidecar.records.record import RequestRecord
from sidecar.records.retention import Retention
from sidecar.store import open_store
from sidecar.store.base import RequestQuery
from tests.support.waits import wait_for

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
    began = time.monotonic()
    counts = await asyncio.gather(*(_pipelined(running.port, bad, 1000) for _ in range(20)))
    took = time.monotonic() - began
    assert sum(counts) == 20_000
    writer = running.server.app[WRITER]
    await wait_for(lambda: writer.queued() == 0, 5)
    stored = await running.stored()
    lines = running.rows
    spool = Path(running.server.settings.server.data_dir, "spool")
    journal = sum(p.stat().st_size for p in spool.glob("requests.*.jsonl"))
    print(f"20,000 bad-key requests: {len(stored)} rows, {len(lines)} log lines, journal {journal} bytes")
    # 60 a minute from one address: the bucket's 60, and what it refilled (1 a second) while the flood lasted
    allowed = 60 + math.ceil(took) + 1
    assert len(stored) <= allowed and len(lines) <= allowed, took
    assert all(r["status"] == 401 and r["outcome"] == "unauthorized" for r in stored)
    assert journal < allowed * 1000
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


async def test_every_kind_of_pre_auth_reject_is_bounded_also_from_many_addresses(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__reject_rows_per_minute=10, server__trusted_proxies=["127.0.0.0/8"]
    )
    wrong_method = b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
    unknown_path = b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"

    async def pipelined(request: bytes, n: int, times: int = 1) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(request * times)
        count, seen = 0, b""
        while count < n:
            data = await asyncio.wait_for(reader.read(1 << 20), 30)
            if not data:
                break
            seen = seen[-32:] + data
            count += data.count(b"HTTP/1.1 4")
        writer.close()
        await writer.wait_closed()
        return count

    assert await pipelined(wrong_method, 500, 500) == 500
    assert await pipelined(unknown_path, 500, 500) == 500
    # 1,000 different client addresses behind a trusted proxy: each one's own bucket is full, the shared one is not
    spoofed = b"".join(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.%d.%d\r\n"
        b"Authorization: Bearer sk-bad\r\nContent-Length: 0\r\n\r\n" % (i // 250, i % 250)
        for i in range(1000)
    )
    assert await pipelined(spoofed, 1000) == 1000
    await asyncio.sleep(0.5)
    rows = await running.stored()
    print(f"2,000 pre-auth rejects: {len(rows)} rows")
    assert len(rows) <= 5 * 10 + 5  # all sources together: at most five times one source's allowance
    assert len([r for r in rows if r["status"] == 401]) >= 30  # the new addresses had allowances of their own
    statuses = {r["status"] for r in rows}
    assert 405 in statuses and statuses <= {401, 404, 405}


async def test_a_big_sweep_on_sqlite_does_not_make_the_writer_spool(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, store__retention="30d", store__retention_interval=0.3)
    store = running.server.app[STORE]
    for _ in range(20):
        await store.insert_requests([_row(40) for _ in range(5000)])  # 100,000 old rows
    async with aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        end = loop.time() + 30.0
        served = 0
        while loop.time() < end:  # traffic all through the sweep, until the old rows are gone
            async with s.post(running.url + "/v1/chat/completions", json={"model": "m", "messages": []}) as r:
                assert r.status == 200
                served += 1
            if served % 200 == 0 and await store.count_requests() <= served:
                break
    await wait_for(lambda: running.server.app[WRITER].queued() == 0, 5)
    assert await store.count_requests() == served  # the old rows are gone, the new ones are all there
    writer = running.server.app[WRITER]
    assert writer.store_errors == 0 and "store unavailable" not in running.log_text()
