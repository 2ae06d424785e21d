"""The journal and spool under real faults: a full filesystem (a small tmpfs mounted by the test), a store
outage of the length of ten minutes of flush cycles, and the spool's byte cap.

Promises: a journal failure never changes a response and never loses a row the store can take; while the store
is down the spool is one growing segment (no file per flush, no directory listing), the loop stays responsive,
and the replay lands every row exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.app import WRITER
from sidecar.config import WriterCfg
from sidecar.records.record import RequestRecord
from sidecar.records.writer import BatchWriter
from sidecar.store import open_store
from sidecar.store.base import RequestQuery
from tests.support.disks import fill, small_disk
from tests.support.fake_upstream import Script
from tests.support.faults import through
from tests.support.waits import wait_for

STREAM = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


async def stream(s: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with s.post(url + "/v1/chat/completions", json=STREAM) as r:
        return r.status, r.headers["x-request-id"], await r.read()


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def writer_of(running: Any) -> BatchWriter:
    return running.server.app[WRITER]


async def readyz(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


async def test_full_disk_under_concurrent_streams_changes_no_answer_and_loses_no_row(fake, sidecar_factory, tmp_path):
    fake.script = Script(chunks=20, delay_chunks=0.005)
    with small_disk(tmp_path / "disk") as disk:
        running = await sidecar_factory(fake.url, server__data_dir=str(disk))
        async with aiohttp.ClientSession() as s:
            assert (await stream(s, running.url))[0] == 200  # the journal works
            filler = fill(disk)
            results = await asyncio.gather(*(stream(s, running.url) for _ in range(40)))
            for status, rid, body in results:  # byte for byte what the upstream sent
                assert status == 200 and body == fake.sent[rid]
            assert await metric(running.url, "sidecar_writer_journal_failures_total") >= 1
            status, ready = await readyz(running.url)
            assert status == 200 and ready["writers"]["requests"]["journal"] == "failing"
            rows = await running.stored(41)  # the store is fine: rows held in memory reach it
            assert len(rows) == 41
            filler.unlink()  # space returns
            await asyncio.sleep(1.1)  # a failing journal is tried again at most once a second
            results = await asyncio.gather(*(stream(s, running.url) for _ in range(10)))
            assert all(status == 200 and body == fake.sent[rid] for status, rid, body in results)
            assert (await readyz(running.url))[1]["writers"]["requests"]["journal"] == "ok"
        assert len(await running.stored(51)) == 51
        assert writer_of(running).unjournaled > 0  # some rows were in no journal, and still reached the store
        log = running.log_text()
        assert log.count("journal write failed") == 1 and log.count("journal writable again") == 1
        await running.server.runner.cleanup()  # close() on the full-then-freed disk does not raise


def _rows(n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        rec = RequestRecord.start("POST", "/v1/chat/completions")
        rec.status, rec.model = 200, "m"
        out.append(rec.finish().as_row())
    return out


async def test_journal_and_store_both_gone_hold_queue_size_rows_then_drop(tmp_path, log_catcher):
    """SQLite and the journal on one full filesystem: neither takes a row. Up to `queue_size` rows wait in
    memory, the rest are dropped and counted; once space returns the held rows land."""
    with small_disk(tmp_path / "disk", "1m") as disk:
        store = open_store(f"sqlite:///{disk}/s.db")
        await store.open()
        await store.migrate()
        writer = BatchWriter(store, WriterCfg(queue_size=30, flush_interval_ms=10_000), str(disk / "spool"))
        await writer.start()
        filler = fill(disk)
        rows = _rows(40)
        for row in rows:
            writer.put(row)  # never raises
        await writer.flush()
        assert writer.status()["held_rows"] == 30 and writer.dropped == 10
        assert writer.status()["journal"] == "failing"
        filler.unlink()
        writer._probe_at = 0.0  # the backoff is not what this test is about
        await writer.flush()
        assert await store.count_requests() == 30
        await writer.close()
        await store.close()
    assert sum("rows dropped" in line for line in log_catcher.lines) == 1


async def write_one(url: str, spool: Path, row: dict[str, Any]) -> tuple[BatchWriter, list[dict[str, Any]]]:
    """One row through a real writer into the store at `url`; the writer and what the store holds after."""
    store = open_store(url)
    await store.open()
    await store.migrate()
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(spool))
    await writer.start()
    writer.put(row)
    await writer.flush()
    await writer.close()
    stored = await store.requests(RequestQuery())
    await store.close()
    return writer, stored


async def test_dead_letter_file_is_private(tmp_path, pg_url):
    (row,) = _rows(1)
    # refused by PostgreSQL even after sanitising
    writer, _ = await write_one(pg_url, tmp_path / "spool", {**row, "status": "not a number"})
    dead = tmp_path / "spool" / "requests.dead.jsonl"
    assert writer.dead == 1 and dead.exists()
    assert dead.stat().st_mode & 0o777 == 0o600


async def test_nul_in_a_text_column_is_stripped_not_dead_lettered(tmp_path, pg_url):
    (row,) = _rows(1)
    poisoned = {**row, "model": "a\x00b", "client_request_id": "x\x00", "error_code": "\x00"}
    writer, (stored,) = await write_one(pg_url, tmp_path / "spool", poisoned)
    assert writer.dead == 0 and stored["model"] == "ab" and stored["client_request_id"] == "x"


@pytest.mark.slow
async def test_ten_minute_outage_one_segment_responsive_loop_exact_replay(fake, pg_proxy, pg_url, sidecar_factory):
    """3,000 flush cycles with PostgreSQL down (5 ms apart: the cycles of 10 minutes at the default 200 ms),
    under a steady load: the spool stays one or two files, /healthz answers fast, and every row lands once."""
    fake.script = Script(chunks=3)
    running = await sidecar_factory(
        fake.url, store__url=through(pg_proxy, pg_url), store__op_timeout=1.0, writer__flush_interval_ms=2
    )
    spool_dir = Path(running.server.settings.server.data_dir, "spool")
    writer = running.server.app[WRITER]
    async with aiohttp.ClientSession() as s:
        assert (await stream(s, running.url))[0] == 200
        await running.stored(1)
        await pg_proxy.down()
        loop = asyncio.get_running_loop()
        stop = loop.time() + 22.0
        cycles_before = writer.cycles
        files: list[int] = []
        latencies: list[float] = []

        async def load() -> int:
            n = 0
            while loop.time() < stop:
                status, _, _ = await stream(s, running.url)
                assert status == 200
                n += 1
            return n

        async def probe() -> None:
            while loop.time() < stop:
                t0 = loop.time()
                async with s.get(running.url + "/healthz") as r:
                    assert r.status == 200
                latencies.append(loop.time() - t0)
                files.append(len(list(spool_dir.glob("requests.*.jsonl"))))
                await asyncio.sleep(0.02)

        counts = await asyncio.gather(*(load() for _ in range(3)), probe())
        served = sum(c for c in counts if c is not None)
        assert writer.status()["store"] == "down"
        await pg_proxy.up()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    print(
        f"outage: {served} requests, {writer.cycles - cycles_before} flush cycles, healthz p99 {p99 * 1000:.1f} ms, "
        f"max spool files {max(files)}, spool bytes {writer.status()['spool_bytes']}"
    )
    assert writer.cycles - cycles_before >= 2500
    assert max(files) <= 3, f"the spool grew to {max(files)} files"
    assert p99 < 0.050, f"healthz p99 {p99 * 1000:.1f} ms during the outage"
    rows = await running.stored(served + 1, timeout=60)
    assert len(rows) == served + 1 == len({r["request_id"] for r in rows})


async def test_spool_cap_keeps_the_oldest_rows_on_disk_and_holds_the_rest(fake, pg_proxy, pg_url, sidecar_factory):
    running = await sidecar_factory(
        fake.url,
        store__url=through(pg_proxy, pg_url),
        store__op_timeout=1.0,
        writer__spool_max_bytes=20_000,
        writer__flush_interval_ms=20,
    )
    writer = running.server.app[WRITER]
    spool_dir = Path(running.server.settings.server.data_dir, "spool")
    async with aiohttp.ClientSession() as s:
        await pg_proxy.down()
        for _ in range(100):  # ~600 bytes a row: the cap is reached after about 30
            assert (await stream(s, running.url))[0] == 200
        await asyncio.sleep(0.2)
        on_disk = sum(p.stat().st_size for p in spool_dir.glob("requests.*.jsonl"))
        status = writer.status()
        assert on_disk <= 20_000 and status["journal"] == "full" and status["held_rows"] > 0
        ready, doc = await readyz(running.url)  # rows can go nowhere but memory: take this replica out
        assert ready == 503 and doc["reason"] == "records" and doc["writers"]["requests"]["journal"] == "full", doc
        assert doc["store"] == "down"
        await pg_proxy.up()
    rows = await running.stored(100, timeout=30)
    assert len(rows) == 100 == len({r["request_id"] for r in rows})
    assert writer.status()["journal"] == "ok" or writer.status()["spool_bytes"] == 0


async def test_spool_left_by_a_killed_process_is_replayed_at_start(tmp_path):
    """Segments are listed once, at start; a torn last line is skipped; nothing is inserted twice."""
    spool = tmp_path / "spool"
    spool.mkdir()
    rows = _rows(5)
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    (spool / "requests.00000007.jsonl").write_bytes(lines + b'{"request_id": "torn')
    (spool / "requests.00000009.jsonl").write_bytes(lines[: lines.index(b"\n") + 1])  # a duplicate row
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    await store.open()
    await store.migrate()
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(spool))
    await writer.start()
    assert await store.count_requests() == 5
    writer.put(_rows(1)[0])
    await writer.close()
    assert await store.count_requests() == 6
    await store.close()
    assert not list(spool.glob("requests.*.jsonl"))


async def test_rows_put_while_the_spool_is_being_replayed_are_kept(tmp_path, pg_url, pg_proxy):
    """The store comes back slowly: rows keep arriving while the spool (the current segment too) is replayed."""
    store = open_store(through(pg_proxy, pg_url), op_timeout=2.0)
    await store.open()
    await store.migrate()
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000, max_rows=3), str(tmp_path / "spool"))
    await writer.start()
    rows = _rows(60)
    for row in rows[:5]:
        writer.put(row)
    await pg_proxy.down()
    await writer.flush()  # the store is gone: the rows are spooled
    assert writer.status()["store"] == "down"
    for row in rows[5:10]:
        writer.put(row)  # written while down: in the current segment only
    await pg_proxy.up()
    pg_proxy.latency = 0.05  # every answer late: the replay takes a while
    writer._probe_at = 0.0  # the backoff is not what this test is about
    recovery = asyncio.create_task(writer.flush())
    for row in rows[10:40]:
        await asyncio.sleep(0.03)
        writer.put(row)  # arriving during the replay
    await recovery
    for row in rows[40:]:
        writer.put(row)
    pg_proxy.latency = 0
    await writer.close()
    assert await store.count_requests() == 60
    await store.close()


async def test_a_long_outage_spools_into_segments_of_bounded_size(fake, pg_proxy, pg_url, sidecar_factory):
    running = await sidecar_factory(
        fake.url,
        store__url=through(pg_proxy, pg_url),
        store__op_timeout=1.0,
        writer__spool_segment_bytes=8192,
        writer__flush_interval_ms=20,
    )
    spool_dir = Path(running.server.settings.server.data_dir, "spool")
    async with aiohttp.ClientSession() as s:
        await pg_proxy.down()
        writer = writer_of(running)
        try:
            assert (await stream(s, running.url))[0] == 200
            await wait_for(lambda: writer.status()["store"] == "down", 10)  # the outage is noticed
            for _ in range(99):  # ~600 bytes a row: ~60 KB, several segments
                assert (await stream(s, running.url))[0] == 200
            await asyncio.sleep(0.1)
            sizes = [p.stat().st_size for p in spool_dir.glob("requests.*.jsonl")]
        finally:
            await pg_proxy.up()
    # the first one also holds what was queued before the outage was noticed
    assert len(sizes) >= 4 and sorted(sizes)[-2] < 8192 + 1000, sizes
    rows = await running.stored(100, timeout=30)
    assert len(rows) == 100 == len({r["request_id"] for r in rows})
