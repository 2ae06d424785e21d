"""The batch writer's own contract, against both stores: rows wait for a batch (size or time), a row the store
refuses costs only itself, close() drains, and what the store could not take is replayed exactly once."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson

from sidecar.config import WriterCfg
from sidecar.records.writer import BatchWriter
from sidecar.store import open_store
from tests.support.faults import Fault, through
from tests.support.stores import opened, refuse_poison, rows
from tests.support.waits import wait_for


async def test_rows_wait_for_a_full_batch_or_the_interval(store_url, tmp_path):
    store = await opened(store_url)
    writer = BatchWriter(store, WriterCfg(max_rows=10, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    batch = rows(10)
    for row in batch[:9]:
        writer.put(row)
    await asyncio.sleep(0.3)
    assert await store.count_requests() == 0 and writer.queued() == 9  # not a batch yet, and not time yet
    writer.put(batch[9])  # the tenth: a full batch goes at once
    await wait_for(lambda: writer.written == 10, 5)
    assert await store.count_requests() == 10
    await writer.close()
    timed = BatchWriter(store, WriterCfg(max_rows=1000, flush_interval_ms=50), str(tmp_path / "spool2"))
    await timed.start()
    timed.put(rows(1)[0])  # one row: it goes when the interval is up
    await wait_for(lambda: timed.written == 1, 5)
    await timed.close()
    await store.close()


async def test_a_row_the_store_refuses_costs_only_itself(store_url, tmp_path):
    store = await opened(store_url)
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    batch = rows(50)
    batch[25] = {**batch[25], "method": None}  # NOT NULL: refused in any batch, and after sanitising too
    for row in batch:
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 49 and writer.dead == 1 and writer.written == 49
    dead = [orjson.loads(line) for line in (tmp_path / "spool" / "requests.dead.jsonl").read_bytes().splitlines()]
    assert [d["request_id"] for d in dead] == [batch[25]["request_id"]]
    await writer.close()
    await store.close()


async def test_a_row_the_store_itself_refuses_among_good_ones_costs_only_itself(store_url, tmp_path):
    """149 good rows and one the store's own rule refuses, in one flush of 150 (on SQLite: after the first
    100-row transaction committed): 149 stored and counted, one dead-lettered and counted, the writer alive."""
    store = await opened(store_url)
    await refuse_poison(store_url)
    writer = BatchWriter(store, WriterCfg(max_rows=150, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    batch = rows(150)
    batch[120] = {**batch[120], "model": "poison"}
    for row in batch:
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 149 and writer.written == 149 and writer.dead == 1
    dead = [orjson.loads(line) for line in (tmp_path / "spool" / "requests.dead.jsonl").read_bytes().splitlines()]
    assert [d["request_id"] for d in dead] == [batch[120]["request_id"]]
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in writer.collect() for s in m.samples}
    assert metrics[("sidecar_writer_rows_total", (("result", "dead_lettered"), ("table", "requests")))] == 1
    assert metrics[("sidecar_writer_rows_total", (("result", "written"), ("table", "requests")))] == 149
    for row in rows(5):  # alive: the next rows land
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 154 and writer.dead == 1
    await writer.close()
    await store.close()


async def test_close_drains_what_is_queued(store_url, tmp_path):
    store = await opened(store_url)
    writer = BatchWriter(store, WriterCfg(max_rows=1000, flush_interval_ms=60_000), str(tmp_path / "spool"))
    await writer.start()
    for row in rows(300):
        writer.put(row)
    await writer.close()  # long before the interval
    assert await store.count_requests() == 300
    assert not list(Path(tmp_path / "spool").glob("requests.*.jsonl"))  # nothing left behind
    await store.close()


async def test_what_the_store_could_not_take_is_replayed_exactly_once(store_url, tmp_path):
    store = await opened(store_url)
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    batch = rows(40)
    for row in batch[:20]:
        writer.put(row)
    await writer.flush()
    # The store refuses writes as it would in an outage: SQLite locked by another writer, PostgreSQL gone.
    lock = None
    if store_url.startswith("sqlite"):
        lock = sqlite3.connect(store_url[len("sqlite:///") :], isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
    else:
        await store.close()
    for row in batch[20:]:
        writer.put(row)
    await writer.flush()
    assert writer.status()["store"] == "down" and writer.spooled >= 20
    if lock is not None:
        lock.execute("ROLLBACK")
        lock.close()
    else:
        await store.open()
    writer._probe_at = 0.0  # the backoff is not what this test is about
    await writer.flush()
    assert await store.count_requests() == 40
    await writer.close()
    await store.close()


async def test_a_batch_committed_but_never_acknowledged_is_stored_once(pg_url, pg_proxy, tmp_path):
    """At least once, exactly one row: PostgreSQL commits a batch and its answer is lost on the way back (the
    fault proxy holds the connection from the `INSERT 0 n` reply on). The writer times out, spools the batch,
    replays it when the store answers again, and the store keeps one row each: nothing dead-lettered."""
    await (await opened(pg_url)).close()  # migrated
    store = open_store(through(pg_proxy, pg_url), op_timeout=1.0)
    await store.open()
    direct = await opened(pg_url)
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    pg_proxy.fault = Fault("hold", at=b"INSERT 0 ", hold_for=2.0)
    batch = rows(40)
    for row in batch:
        writer.put(row)
    await writer.flush()  # committed on the server; the answer never came: to the writer, a failure
    assert pg_proxy.faults_hit == 1 and await direct.count_requests() == 40
    assert writer.status()["store"] == "down" and list((tmp_path / "spool").glob("requests.*.jsonl"))
    writer._probe_at = 0.0  # the backoff is not what this test is about
    for _ in range(50):
        await writer.flush()
        if writer.status()["store"] == "ok" and not writer.spool.pending:
            break
        writer._probe_at = 0.0
        await asyncio.sleep(0.1)
    assert await direct.count_requests() == 40 and writer.dead == 0
    assert not (tmp_path / "spool" / "requests.dead.jsonl").exists()
    await writer.close()
    await store.close()
    await direct.close()


async def test_without_a_spool_a_stalled_store_holds_queue_size_rows_and_drops_the_rest(tmp_path):
    """writer.spool off and the store locked: up to queue_size rows wait in memory, the rest are dropped and
    counted, memory stays flat however many come; once the store takes rows again the held ones land."""
    import tracemalloc

    url = f"sqlite:///{tmp_path}/s.db"
    store = await opened(url)
    writer = BatchWriter(
        store, WriterCfg(spool=False, queue_size=30, max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool")
    )
    await writer.start()
    locker = sqlite3.connect(f"{tmp_path}/s.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # every write of the writer's fails: locked
    for row in rows(40):
        writer.put(row)
    await writer.flush()
    status = writer.status()
    assert (status["journal"], status["held_rows"], status["dropped_rows"]) == ("off", 30, 10)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for row in rows(20_000):
        writer.put(row)
    await writer.flush()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert writer.status()["held_rows"] == 30 and writer.dropped == 20_010
    assert grown < 256 * 1024, grown  # 20,000 rows of ~600 bytes went through; what stayed is bounded
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in writer.collect() for s in m.samples}
    assert metrics[("sidecar_writer_rows_total", (("result", "dropped"), ("table", "requests")))] == 20_010
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").glob("requests.*.jsonl"))
    locker.execute("ROLLBACK")
    locker.close()
    writer._probe_at = 0.0  # the backoff is not what this test is about
    await writer.flush()
    assert await store.count_requests() == 30
    await writer.close()
    await store.close()


async def test_a_missing_grant_keeps_rows_in_the_spool_not_the_dead_letter_file(pg_url, tmp_path):
    """A role that may not insert (a grant revoked by mistake) is the database's fault, not the rows': they
    spool and land, once each, when the grant returns; nothing is dead-lettered."""
    import psycopg

    await (await opened(pg_url)).close()  # migrated by the owner
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("CREATE ROLE scribe LOGIN")
        await conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO scribe")
    as_scribe = pg_url.replace("postgresql://postgres@", "postgresql://scribe@")
    store = open_store(as_scribe)
    await store.open()
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    for row in rows(25):
        writer.put(row)
    await writer.flush()
    assert writer.dead == 0 and writer.status()["store"] == "down" and writer.status()["spool_bytes"] > 0
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        # (and UPDATE: a stored row is charged to its key's budget balance in the same statement)
        await conn.execute("GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO scribe")
    writer._probe_at = 0.0  # the backoff is not what this test is about
    await writer.flush()
    assert await store.count_requests() == 25 and writer.dead == 0
    assert not (tmp_path / "spool" / "requests.dead.jsonl").exists()
    await writer.close()
    await store.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM scribe")
        await conn.execute("DROP ROLE scribe")


async def test_a_row_sqlite_cannot_bind_costs_only_itself(tmp_path):
    """A column holding an object (SQLite cannot bind it) was a 'transient' error: the batch spooled and was
    retried for ever, and no later row landed. It is the row's fault: dead-lettered alone."""
    store = await opened(f"sqlite:///{tmp_path}/s.db")
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    batch = rows(10)
    batch[4] = {**batch[4], "model": {"nested": 1}}
    for row in batch:
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 9 and writer.dead == 1 and writer.status()["store"] == "ok"
    for row in rows(3):
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 12
    await writer.close()
    await store.close()


async def test_a_spooled_line_that_is_not_an_object_does_not_stall_the_start(tmp_path):
    """A segment left by an earlier run with a line that is JSON but not a row (`1`, `[]`): start() raised and
    every cycle failed. Now that line is dead-lettered and the rows around it land."""
    store = await opened(f"sqlite:///{tmp_path}/s.db")
    spool = tmp_path / "spool"
    spool.mkdir()
    good = rows(4)
    lines = [orjson.dumps(good[0]), orjson.dumps(good[1]), b"1", b"[]", orjson.dumps(good[2]), orjson.dumps(good[3])]
    (spool / "requests.00000000000000000001.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    writer = BatchWriter(store, WriterCfg(max_rows=100, flush_interval_ms=10_000), str(spool))
    await writer.start()
    assert await store.count_requests() == 4 and writer.dead == 2
    writer.put(rows(1)[0])
    await writer.flush()
    assert await store.count_requests() == 5
    await writer.close()
    await store.close()


async def test_an_outage_without_a_journal_is_logged_once_and_backs_off(tmp_path, log_catcher):
    """Nothing spooled (no journal): a probe used to declare the store back before anything reached it, so
    the log flapped every probe and the backoff never grew."""
    store = await opened(f"sqlite:///{tmp_path}/s.db")
    writer = BatchWriter(store, WriterCfg(spool=False, max_rows=100, flush_interval_ms=20), str(tmp_path / "spool"))
    await writer.start()
    locker = sqlite3.connect(f"{tmp_path}/s.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    writer.put(rows(1)[0])
    await asyncio.sleep(1.0)  # probes at 20, 40, 80, 160, 320 ms... (about 6 in a second, not 50)
    probes = writer.store_errors
    assert 3 <= probes <= 10, probes
    locker.execute("ROLLBACK")
    locker.close()
    await wait_for(lambda: writer.written == 1, 5)
    lines = log_catcher.lines
    assert sum("store unavailable" in line for line in lines) == 1
    assert sum("store available again" in line for line in lines) == 1
    await writer.close()
    await store.close()
