"""The BatchWriter's contract in exact numbers, on SQLite: what `put` returns and keeps, what every metric and
`status()` field reads after each kind of event (a full journal, an outage, a poison row, a drain that times out),
the log lines an operator alerts on, the spool files on disk, and the rows that reach the store, each exactly once.

A locked SQLite database (another connection holding `BEGIN EXCLUSIVE`) is the store failing for real: every write
of the writer's is refused at once as `database is locked`, a transient error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import shutil
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.config import WriterCfg
from sidecar.records.rows import sanitise
from sidecar.records.writer import BatchWriter
from sidecar.store.base import RequestQuery
from tests.support.stores import opened, refuse_poison, rows
from tests.support.waits import wait_for

LOCKED = "database is locked"
AVAILABLE = "store available again; spool replayed"


class WriterLog(logging.Handler):
    """The writer's own log records (not the journal's, which share its logger): (level, message, fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.module == "writer":
            self.records.append((record.levelname, record.getMessage(), record.__dict__.get("fields")))

    def of(self, message: str) -> list[tuple[str, str, Any]]:
        return [r for r in self.records if r[1] == message]


@pytest.fixture
def wlog() -> Iterator[WriterLog]:
    handler = WriterLog()
    logger = logging.getLogger("sidecar.writer")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    opened_store = await opened(f"sqlite:///{tmp_path}/s.db")
    yield opened_store
    await opened_store.close()


def lock(tmp_path: Path) -> sqlite3.Connection:
    """Another writer holds SQLite's write lock: every insert of the writer's fails at once."""
    conn = sqlite3.connect(f"{tmp_path}/s.db", isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def unlock(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")
    conn.close()


def fixed_rows(n: int, first: int = 0) -> list[dict[str, Any]]:
    """Rows whose JSON lines all have the same length (fixed ids and times)."""
    return [
        {
            **row,
            "request_id": f"req-{first + i:08d}",
            "model": "m",
            "started_at": 1_700_000_000.5,
            "finished_at": 1_700_000_001.5,
            "latency_ms": 1000.0,
        }
        for i, row in enumerate(rows(n))
    ]


ZERO = {
    "sidecar_writer_queue_depth": 0,
    "sidecar_writer_held_rows": 0,
    "sidecar_writer_rows_total/written": 0,
    "sidecar_writer_rows_total/spooled": 0,
    "sidecar_writer_rows_total/unjournaled": 0,
    "sidecar_writer_rows_total/dropped": 0,
    "sidecar_writer_rows_total/dead_lettered": 0,
    "sidecar_writer_store_up": 1,
    "sidecar_writer_journal_state/ok": 1,
    "sidecar_writer_journal_state/failing": 0,
    "sidecar_writer_journal_state/full": 0,
    "sidecar_writer_journal_state/off": 0,
    "sidecar_writer_journal_failures_total": 0,
    "sidecar_writer_spool_bytes": 0,
    "sidecar_writer_spool_segments": 0,
    "sidecar_writer_store_errors_total": 0,
    "sidecar_writer_failed_cycles_total": 0,
    "sidecar_writer_flushes_total": 0,
}
FLUSH_SECONDS = "sidecar_writer_flush_seconds_total"


def samples(writer: BatchWriter) -> dict[str, float]:
    """Every sample of writer.collect(), keyed `name` or `name/<result or state>`; each carries the table label."""
    out: dict[str, float] = {}
    for family in writer.collect():
        for s in family.samples:
            labels = dict(s.labels)
            assert labels.pop("table") == writer.name, s
            named = {"sidecar_writer_rows_total": ["result"], "sidecar_writer_journal_state": ["state"]}
            assert list(labels) == named.get(s.name, []), s
            key = "/".join([s.name, *labels.values()])
            assert key not in out, key
            out[key] = s.value
    return out


def expect(**changed: float) -> dict[str, float]:
    """ZERO with some samples changed: `rows_written=3` is sidecar_writer_rows_total/written, `held_rows=2` is
    sidecar_writer_held_rows, `journal_state=full` moves the 1 to that state."""
    out = dict(ZERO)
    for key, value in changed.items():
        if key == "journal_state":
            for state in ("ok", "failing", "full", "off"):
                out[f"sidecar_writer_journal_state/{state}"] = int(state == value)
            continue
        if key.startswith("rows_"):
            name = f"sidecar_writer_rows_total/{key.removeprefix('rows_')}"
        elif f"sidecar_writer_{key}_total" in out:
            name = f"sidecar_writer_{key}_total"
        else:
            name = f"sidecar_writer_{key}"
        assert name in out, key
        out[name] = value
    return out


def without_time(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k != FLUSH_SECONDS}


def segments(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.glob("requests.*.jsonl") if p.name.split(".")[1].isdigit())


def body(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


async def stored_ids(store: Any) -> set[str]:
    return {r["request_id"] for r in await store.requests(RequestQuery(limit=100_000))}


# --- values -------------------------------------------------------------------------------------------------


def test_sanitise_keeps_what_a_database_takes_and_replaces_the_rest():
    big = 2**63 - 1
    row = {
        "text": "a\ud800b\x00c",  # a lone surrogate and a NUL
        "long": "é" * 5000,
        "yes": True,
        "no": False,
        "max": big,
        "min": -big,
        "over": big + 1,
        "under": -big - 1,
        "zero": 0,
        "real": -1.5,
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "none": None,
        "list": [1],
    }
    assert sanitise(row) == {
        "text": "a?bc",
        "long": "é" * 4096,
        "yes": True,
        "no": False,
        "max": big,
        "min": -big,
        "over": None,
        "under": None,
        "zero": 0,
        "real": -1.5,
        "nan": None,
        "inf": None,
        "-inf": None,
        "none": None,
        "list": [1],
    }
    assert row["text"] == "a\ud800b\x00c"  # a copy: the row itself is untouched


async def test_put_returns_the_rows_json_line_or_a_sanitised_one_when_json_cannot_hold_it(tmp_path, store):
    writer = BatchWriter(store, WriterCfg(spool=False), str(tmp_path / "spool"))
    plain = {"request_id": "a", "n": 2**63, "x": 1.25, "s": "é\x00"}
    assert writer.put(plain) == orjson.dumps(plain)
    odd = {"request_id": "b", "text": "a\ud800\x00b", "big": 2**64, "price": Decimal("1.50"), "n": 7}
    line = writer.put(odd)
    assert orjson.loads(line) == {"request_id": "b", "text": "a?b", "big": None, "price": "1.50", "n": 7}
    assert writer.queued() == 2 and writer.status()["held_rows"] == 2


# --- a new writer -------------------------------------------------------------------------------------------


async def test_a_new_writer_reports_every_series_at_zero(tmp_path, store, wlog):
    spooled = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(tmp_path / "spool"))
    assert spooled.store is store and not spooled.alive
    families = [(m.name, m.documentation, m.type) for m in spooled.collect()]
    assert families == [
        ("sidecar_writer_queue_depth", "Rows waiting to be written.", "gauge"),
        ("sidecar_writer_held_rows", "Rows held only in memory (the journal failed, is full, or is off).", "gauge"),
        ("sidecar_writer_rows", "Rows by what happened to them.", "counter"),
        ("sidecar_writer_store_up", "1 while the store takes rows.", "gauge"),
        ("sidecar_writer_journal_state", "The journal's state: 1 for the current one.", "gauge"),
        (
            "sidecar_writer_journal_failures",
            "Journal appends that failed (disk full, I/O error, read-only volume).",
            "counter",
        ),
        ("sidecar_writer_spool_bytes", "Bytes in the journal not yet in the store.", "gauge"),
        ("sidecar_writer_spool_segments", "Spooled segments waiting for replay.", "gauge"),
        ("sidecar_writer_store_errors", "Failed store writes.", "counter"),
        ("sidecar_writer_failed_cycles", "Flush cycles ended by an unexpected error.", "counter"),
        ("sidecar_writer_flush_seconds", "Time spent flushing.", "counter"),
        ("sidecar_writer_flushes", "Flush cycles.", "counter"),
    ]
    fresh = {"store": "ok", "journal": "ok", "held_rows": 0, "spool_bytes": 0, "dropped_rows": 0}
    assert spooled.status() == fresh
    assert samples(spooled) == {**expect(), FLUSH_SECONDS: 0.0}
    await spooled.start()
    assert spooled.alive and "writer-requests" in {t.get_name() for t in asyncio.all_tasks()}
    assert spooled.status() == fresh and samples(spooled) == {**expect(), FLUSH_SECONDS: 0.0}
    assert segments(tmp_path / "spool") == ["requests.00000001.jsonl"]  # the first segment, empty
    await spooled.close()
    assert not spooled.alive and segments(tmp_path / "spool") == []

    bare = BatchWriter(store, WriterCfg(spool=False, flush_interval_ms=10_000), str(tmp_path / "bare"), "audit")
    off = {"store": "ok", "journal": "off", "held_rows": 0, "spool_bytes": 0, "dropped_rows": 0}
    assert bare.status() == off and bare.cycles == 0
    assert samples(bare) == {**expect(journal_state="off"), FLUSH_SECONDS: 0.0}
    await bare.start()
    assert bare.status() == off and "writer-audit" in {t.get_name() for t in asyncio.all_tasks()}
    await bare.close()
    assert bare.cycles == 1 and not bare.alive  # one turn: the one close() woke
    assert not (tmp_path / "bare").exists()  # no journal, no directory
    assert wlog.records == []


# --- batches --------------------------------------------------------------------------------------------------


async def test_rows_are_journaled_then_inserted_in_batches_of_max_rows(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(max_rows=10, flush_interval_ms=10_000), str(spool))
    await writer.start()
    batch = rows(25)
    lines = [writer.put(row) for row in batch]
    assert (spool / "requests.00000001.jsonl").read_bytes() == body(lines)  # one append per row, in order
    assert writer.queued() == 25 and writer.status()["spool_bytes"] == len(body(lines))
    started = time.perf_counter()
    await writer.flush()  # three batches: 10, 10, 5
    took = time.perf_counter() - started
    assert await stored_ids(store) == {r["request_id"] for r in batch}
    values = samples(writer)
    first = values.pop(FLUSH_SECONDS)
    assert 0 < first <= took  # the time this flush took, no more
    assert values == expect(rows_written=25, flushes=1)
    assert segments(spool) == ["requests.00000002.jsonl"]  # the written segment is gone; a fresh one is open
    await writer.flush()  # nothing queued: not a flush
    assert samples(writer) == {**expect(rows_written=25, flushes=1), FLUSH_SECONDS: first}
    writer.put(rows(1)[0])
    await writer.flush()
    assert samples(writer)[FLUSH_SECONDS] > first  # a counter: this flush's time is added
    assert without_time(samples(writer)) == expect(rows_written=26, flushes=2)
    await writer.close()
    assert segments(spool) == [] and wlog.records == []


async def test_held_rows_wake_the_writer_at_max_rows_and_it_keeps_running(tmp_path, store):
    writer = BatchWriter(store, WriterCfg(spool=False, max_rows=3, flush_interval_ms=60_000), str(tmp_path / "sp"))
    await writer.start()
    for row in rows(3):
        writer.put(row)  # only in memory: the third makes a batch
    await wait_for(lambda: writer.written == 3, 5)
    assert writer.alive
    for row in rows(3):
        writer.put(row)
    await wait_for(lambda: writer.written == 6, 5)
    assert writer.queued() == 0 and await store.count_requests() == 6
    await writer.close()
    assert writer.cycles == 3 and writer.flushes == 2  # two batches, then the turn close() woke


# --- a journal that cannot take rows ----------------------------------------------------------------------------


async def test_a_full_journal_holds_queue_size_rows_and_says_once_per_episode_that_it_drops(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(spool_max_bytes=1, queue_size=3, flush_interval_ms=10_000), str(spool))
    await writer.start()
    for row in rows(5):
        writer.put(row)  # no room in the journal: 3 held, 2 dropped
    assert writer.status() == {"store": "ok", "journal": "full", "held_rows": 3, "spool_bytes": 0, "dropped_rows": 2}
    assert without_time(samples(writer)) == expect(
        queue_depth=3, held_rows=3, rows_unjournaled=5, rows_dropped=2, journal_state="full"
    )
    dropped = (
        "ERROR",
        "rows dropped: neither the journal nor the store can take them and writer.queue_size is reached",
        {"table": "requests", "held": 3},
    )
    assert wlog.records == [dropped]
    await writer.flush()  # the held rows reach the store
    assert await store.count_requests() == 3 and writer.queued() == 0
    again = ("WARNING", "rows are written again", {"table": "requests", "dropped": 2})
    assert wlog.records == [dropped, again]
    assert segments(spool) == ["requests.00000001.jsonl"]  # no segment was rotated for held rows
    for row in rows(4):
        writer.put(row)  # a second episode: said again
    assert wlog.records == [dropped, again, dropped]
    await writer.flush()
    said_again = ("WARNING", "rows are written again", {"table": "requests", "dropped": 3})
    assert wlog.records == [dropped, again, dropped, said_again]
    assert without_time(samples(writer)) == expect(
        rows_written=6, rows_unjournaled=9, rows_dropped=3, journal_state="full", flushes=2
    )
    await writer.close()


async def test_without_a_journal_held_rows_wait_for_the_store_within_queue_size(tmp_path, store, wlog):
    writer = BatchWriter(store, WriterCfg(spool=False, queue_size=3, flush_interval_ms=10_000), str(tmp_path / "sp"))
    await writer.start()
    for row in rows(3):
        writer.put(row)
    await writer.flush()  # the store is fine: written
    assert await store.count_requests() == 3
    locker = lock(tmp_path)
    batch = rows(3)
    for row in batch:
        writer.put(row)
    await writer.flush()  # refused: exactly queue_size rows go back to memory, none dropped
    await writer.flush()  # within the backoff (2 s): not tried again
    assert writer.status() == {"store": "down", "journal": "off", "held_rows": 3, "spool_bytes": 0, "dropped_rows": 0}
    assert without_time(samples(writer)) == expect(
        queue_depth=3, held_rows=3, rows_written=3, store_up=0, journal_state="off", store_errors=1, flushes=2
    )
    assert (
        wlog.of("rows dropped: neither the journal nor the store can take them and writer.queue_size is reached") == []
    )
    assert wlog.of("store unavailable; spooling rows") == [
        ("WARNING", "store unavailable; spooling rows", {"table": "requests", "error": LOCKED})
    ]
    unlock(locker)
    await writer.close()  # one last try, whatever the backoff
    assert await stored_ids(store) >= {r["request_id"] for r in batch} and await store.count_requests() == 6


async def test_without_a_journal_rows_still_held_at_close_are_counted_lost(tmp_path, store, wlog):
    writer = BatchWriter(store, WriterCfg(spool=False, flush_interval_ms=10_000), str(tmp_path / "sp"))
    await writer.start()
    locker = lock(tmp_path)
    for row in rows(3):
        writer.put(row)
    await writer.close()
    unlock(locker)
    assert writer.status()["dropped_rows"] == 3 and writer.queued() == 0
    assert wlog.of("rows lost at shutdown: neither the store nor the journal could take them") == [
        (
            "ERROR",
            "rows lost at shutdown: neither the store nor the journal could take them",
            {"table": "requests", "rows": 3},
        )
    ]


@pytest.mark.parametrize("room", ["all", "one"])
async def test_rows_held_at_close_go_to_a_journal_that_works_again(tmp_path, store, wlog, room):
    """The spool directory vanishes (the journal fails) while the store is locked, then comes back before
    close(): the rows held in memory are journaled at close, as many as fit, and replayed at the next start."""
    spool = tmp_path / "spool"
    first, *held = fixed_rows(5)
    size = len(orjson.dumps(first)) + 1
    cap = 1024**3 if room == "all" else size + size // 2  # "one": room for one more row once the spool is empty
    cfg = WriterCfg(queue_size=3, flush_interval_ms=10_000, spool_max_bytes=cap)
    writer = BatchWriter(store, cfg, str(spool))
    await writer.start()
    writer.put(first)
    shutil.rmtree(spool)
    locker = lock(tmp_path)
    await writer.flush()  # refused; and no new segment can be opened: the journal fails
    lines = [writer.put(row) for row in held]  # held in memory: three, the fourth dropped
    assert writer.status() == {
        "store": "down",
        "journal": "failing",
        "held_rows": 3,
        "spool_bytes": size,
        "dropped_rows": 1,
    }
    spool.mkdir()
    await writer.close()
    kept = 3 if room == "all" else 1
    assert writer.dropped == 1 + 3 - kept
    lost = wlog.of("rows lost at shutdown: neither the store nor the journal could take them")
    assert [r[2] for r in lost] == ([] if room == "all" else [{"table": "requests", "rows": 2}])
    assert [p.read_bytes() for p in sorted(spool.glob("requests.*.jsonl"))] == [body(lines[:kept])]
    unlock(locker)
    again = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(spool))
    await again.start()
    assert await stored_ids(store) == {r["request_id"] for r in held[:kept]}
    await again.close()


# --- outages ----------------------------------------------------------------------------------------------------


async def test_an_outage_spools_exact_counts_and_the_replay_lands_every_row_once(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=50), str(spool))
    await writer.start()
    batch = fixed_rows(9)
    locker = lock(tmp_path)
    lines = [writer.put(row) for row in batch[:4]]
    await wait_for(lambda: writer.status()["store"] == "down", 5)
    down_lines = [writer.put(row) for row in batch[4:7]]  # on disk only while the store is down
    on_disk = len(body(lines + down_lines))
    assert writer.status() == {
        "store": "down",
        "journal": "ok",
        "held_rows": 0,
        "spool_bytes": on_disk,
        "dropped_rows": 0,
    }
    values = without_time(samples(writer))
    assert values.pop("sidecar_writer_store_errors_total") >= 1 and values.pop("sidecar_writer_flushes_total") == 1
    assert values == {
        k: v
        for k, v in expect(rows_spooled=7, store_up=0, spool_bytes=on_disk, spool_segments=1).items()
        if k not in ("sidecar_writer_store_errors_total", "sidecar_writer_flushes_total")
    }
    assert (spool / "requests.00000001.jsonl").read_bytes() == body(lines)
    assert (spool / "requests.00000002.jsonl").read_bytes() == body(down_lines)
    unlock(locker)
    await wait_for(lambda: len(wlog.of(AVAILABLE)) == 1, 10)  # the end of the replay
    assert await stored_ids(store) == {r["request_id"] for r in batch[:7]}
    assert writer.status() == {"store": "ok", "journal": "ok", "held_rows": 0, "spool_bytes": 0, "dropped_rows": 0}
    assert segments(spool) == ["requests.00000003.jsonl"]
    outage = [
        ("WARNING", "store unavailable; spooling rows", {"table": "requests", "error": LOCKED}),
        ("INFO", "spool replayed", {"rows": 4, "segment": "requests.00000001.jsonl"}),
        ("INFO", "spool replayed", {"rows": 3, "segment": "requests.00000002.jsonl"}),
        ("WARNING", "store available again; spool replayed", {"table": "requests"}),
    ]
    assert wlog.records == outage

    locker = lock(tmp_path)  # a second outage: said again, counted on top
    for row in batch[7:]:
        writer.put(row)
    await wait_for(lambda: writer.status()["store"] == "down", 5)
    assert writer.spooled == 9
    unlock(locker)
    await wait_for(lambda: len(wlog.of(AVAILABLE)) == 2, 10)
    assert await store.count_requests() == 9
    assert [r[1] for r in wlog.records[4:]] == [
        "store unavailable; spooling rows",
        "spool replayed",
        "store available again; spool replayed",
    ]
    await writer.close()
    assert segments(spool) == []


async def test_the_store_is_probed_with_a_doubling_backoff_reset_after_recovery(tmp_path, store):
    """flush_interval_ms=100: probes at least 0.1, 0.2, 0.4 s apart while the store stays down (the writer's own
    cycles, 0.1 s apart, do the probing); after a recovery the next outage starts at 0.1 s again."""
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=100), str(tmp_path / "spool"))
    await writer.start()
    loop = asyncio.get_running_loop()

    async def probe_times(n: int) -> list[float]:
        """The times of the next n failed store writes (each a probe of a store that is down)."""
        times: list[float] = []
        seen = writer.store_errors
        end = loop.time() + 10
        while len(times) < n and loop.time() < end:
            await asyncio.sleep(0.005)
            if writer.store_errors != seen:
                seen = writer.store_errors
                times.append(loop.time())
        return times

    for outage in range(2):
        locker = lock(tmp_path)
        writer.put(rows(1)[0])
        times = await probe_times(4 if outage == 0 else 3)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) == (3 if outage == 0 else 2), gaps
        # (the times are seen by polling every 5 ms: a gap may look up to 10 ms shorter than it was)
        assert 0.09 <= gaps[0] < 0.6, gaps  # the first retry one interval on, not the 2 s cap
        assert gaps[1] >= 0.19, gaps  # doubled
        if outage == 0:
            assert 0.39 <= gaps[2] < 0.8, gaps  # doubled again (tripling would make it 0.9)
        unlock(locker)
        await wait_for(lambda: writer.written == outage + 1, 5)  # replayed (the next outage starts after that)
    assert await store.count_requests() == 2
    await writer.close()


async def test_close_tries_a_down_store_once_more_whatever_the_backoff(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(spool))
    await writer.start()
    locker = lock(tmp_path)
    batch = rows(3)
    for row in batch:
        writer.put(row)
    await writer.flush()
    assert writer.status()["store"] == "down"
    unlock(locker)
    await writer.flush()  # within the backoff (2 s): not even tried
    assert writer.store_errors == 1 and writer.status()["store"] == "down"
    await writer.close()
    assert await stored_ids(store) == {r["request_id"] for r in batch}
    assert writer.failed_cycles == 0 and segments(spool) == []
    assert [r[1] for r in wlog.records] == [
        "store unavailable; spooling rows",
        "spool replayed",
        "store available again; spool replayed",
    ]


# --- segments -----------------------------------------------------------------------------------------------------


async def test_a_segment_that_reaches_spool_segment_bytes_is_closed_and_replayed_by_the_next_flush(
    tmp_path, store, wlog
):
    """spool_segment_bytes is exactly one row: every row closes its segment (spooled and queued both; the store
    ignores the second insert). A spooled segment deleted meanwhile is skipped, not an outage."""
    spool = tmp_path / "spool"
    batch = fixed_rows(5)
    size = len(orjson.dumps(batch[0])) + 1
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000, spool_segment_bytes=size), str(spool))
    await writer.start()
    for row in batch[:3]:
        writer.put(row)
    assert segments(spool) == [f"requests.{n:08d}.jsonl" for n in (1, 2, 3, 4)]
    assert without_time(samples(writer)) == expect(queue_depth=3, spool_bytes=3 * size, spool_segments=3)
    (spool / "requests.00000002.jsonl").unlink()  # gone from disk; its row is still queued
    await writer.flush()
    assert await stored_ids(store) == {r["request_id"] for r in batch[:3]}
    assert without_time(samples(writer)) == expect(rows_written=3, flushes=1)
    assert writer.queued() == 0 and segments(spool) == ["requests.00000005.jsonl"]
    assert wlog.records == [
        ("INFO", "spool replayed", {"rows": 1, "segment": "requests.00000001.jsonl"}),
        ("INFO", "spool replayed", {"rows": 1, "segment": "requests.00000003.jsonl"}),
    ]

    # The store fails on the replay of such segments: their rows, queued as well, now wait on disk only.
    for row in batch[3:]:
        writer.put(row)
    locker = lock(tmp_path)
    await writer.flush()
    assert writer.status() == {
        "store": "down",
        "journal": "ok",
        "held_rows": 0,
        "spool_bytes": 2 * size,
        "dropped_rows": 0,
    }
    assert without_time(samples(writer)) == expect(
        rows_written=3, rows_spooled=2, store_up=0, store_errors=1, spool_bytes=2 * size, spool_segments=2, flushes=1
    )
    unlock(locker)
    await writer.close()
    assert await store.count_requests() == 5 and segments(spool) == []


async def test_an_unreadable_leftover_segment_is_set_aside_and_the_others_replayed(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    spool.mkdir()
    older, newer = fixed_rows(5), fixed_rows(2, first=5)
    (spool / "requests.00000001.jsonl").write_bytes(body([orjson.dumps(r) for r in older]))
    (spool / "requests.00000002.jsonl").mkdir()  # cannot be read as a file
    (spool / "requests.00000002.jsonl" / "x").write_bytes(b"x")
    (spool / "requests.00000003.jsonl").write_bytes(body([orjson.dumps(r) for r in newer]))
    writer = BatchWriter(store, WriterCfg(max_rows=2, flush_interval_ms=10_000), str(spool))
    await writer.start()  # the replay reads two rows at a time
    assert await stored_ids(store) == {r["request_id"] for r in older + newer}
    assert wlog.records == [
        ("INFO", "spool replayed", {"rows": 5, "segment": "requests.00000001.jsonl"}),
        (
            "ERROR",
            "spool segment unreadable; kept on disk for the next start",
            {"segment": "requests.00000002.jsonl", "error": "Is a directory"},
        ),
        ("INFO", "spool replayed", {"rows": 2, "segment": "requests.00000003.jsonl"}),
    ]
    assert writer.status() == {"store": "ok", "journal": "ok", "held_rows": 0, "spool_bytes": 0, "dropped_rows": 0}
    assert without_time(samples(writer)) == expect(rows_written=7)
    assert segments(spool) == ["requests.00000002.jsonl", "requests.00000004.jsonl"]  # set aside; the current one
    await writer.close()
    assert (spool / "requests.00000002.jsonl" / "x").exists()


# --- rows the store refuses ---------------------------------------------------------------------------------------


async def test_a_value_the_store_cannot_hold_is_stored_sanitised_not_dead_lettered(tmp_path, store, wlog):
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    (row,) = rows(1)
    writer.put({**row, "prompt_tokens": 2**63})  # valid JSON; past SQLite's INTEGER
    await writer.flush()
    (stored,) = await store.requests(RequestQuery())
    assert stored["request_id"] == row["request_id"] and stored["prompt_tokens"] is None
    assert without_time(samples(writer)) == expect(rows_written=1, store_errors=1, flushes=1)
    assert wlog.records == [] and not (tmp_path / "spool" / "requests.dead.jsonl").exists()
    await writer.close()


async def test_poison_rows_are_dead_lettered_privately_and_the_rest_counted_once(tmp_path, store, wlog):
    """Two rows the store's own rule refuses in the second 100-row transaction of a 150-row batch, after earlier
    writes: the first transaction's 100 rows count once, the 48 others once, the two are dead-lettered."""
    await refuse_poison(f"sqlite:///{tmp_path}/s.db")
    spool = tmp_path / "a" / "b" / "spool"  # no journal: the directory is made for the dead letters
    writer = BatchWriter(store, WriterCfg(spool=False, max_rows=150, flush_interval_ms=10_000), str(spool))
    await writer.start()
    for row in rows(5):
        writer.put(row)
    await writer.flush()
    batch = rows(150)
    batch[120] = {**batch[120], "model": "poison"}
    batch[130] = {**batch[130], "model": "poison"}
    lines = [writer.put(row) for row in batch]
    await writer.flush()
    assert await store.count_requests() == 153
    assert without_time(samples(writer)) == expect(
        rows_written=153, rows_dead_lettered=2, store_errors=1, journal_state="off", flushes=2
    )
    dead = spool / "requests.dead.jsonl"
    assert dead.read_bytes() == body([lines[120], lines[130]])
    assert dead.stat().st_mode & 0o777 == 0o600 and spool.stat().st_mode & 0o777 == 0o700
    assert wlog.records == [
        ("ERROR", "row refused by the store; dead-lettered", {"bytes": len(lines[120])}),
        ("ERROR", "row refused by the store; dead-lettered", {"bytes": len(lines[130])}),
    ]
    await writer.close()


async def test_a_row_that_cannot_be_dead_lettered_is_counted_and_logged(tmp_path, store, wlog):
    await refuse_poison(f"sqlite:///{tmp_path}/s.db")
    blocked = tmp_path / "file"
    blocked.write_bytes(b"")  # where the directory should be
    writer = BatchWriter(store, WriterCfg(spool=False, flush_interval_ms=10_000), str(blocked))
    await writer.start()
    line = writer.put({**rows(1)[0], "model": "poison"})
    await writer.flush()
    assert writer.dead == 1 and writer.written == 0
    assert wlog.records == [
        ("ERROR", "row refused by the store and not dead-lettered", {"bytes": len(line), "error": "File exists"})
    ]
    await writer.close()


async def test_a_store_that_goes_away_during_the_row_by_row_retry_keeps_the_batch_spooled(tmp_path, store, wlog):
    await refuse_poison(f"sqlite:///{tmp_path}/s.db")
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(max_rows=150, flush_interval_ms=10_000), str(spool))
    await writer.start()
    batch = rows(150)
    batch[120] = {**batch[120], "model": "poison"}
    for row in batch:
        writer.put(row)
    lockers: list[sqlite3.Connection] = []

    async def lock_when_the_batch_failed() -> None:
        while writer.store_errors == 0:
            await asyncio.sleep(0)
        lockers.append(lock(tmp_path))  # between two rows of the row-by-row retry

    locking = asyncio.create_task(lock_when_the_batch_failed())
    await writer.flush()
    await locking
    assert writer.status()["store"] == "down" and writer.spooled == 150 and writer.dead == 0
    assert await store.count_requests() < 149  # the first transaction's rows, and none after the lock
    unlock(lockers[0])
    await writer.close()
    assert await store.count_requests() == 149 and writer.dead == 1 and segments(spool) == []


# --- close ---------------------------------------------------------------------------------------------------------


async def test_a_drain_that_times_out_mid_flush_keeps_every_row_for_the_next_start(tmp_path, store, wlog):
    spool = tmp_path / "spool"
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=60_000, drain_timeout=0.005), str(spool))
    await writer.start()
    batch = rows(20_000)
    lines = [writer.put(row) for row in batch]
    await writer.close()  # the flush of 20,000 rows takes far longer than 5 ms
    assert not writer.alive
    assert wlog.of("writer drain timed out") == [
        ("ERROR", "writer drain timed out", {"table": "requests", "queued": 0})
    ]
    assert 0 < await store.count_requests() < 20_000
    assert (spool / "requests.00000001.jsonl").read_bytes() == body(lines)  # kept whole: it is the spool now
    assert writer.status()["spool_bytes"] == len(body(lines)) and writer.dropped == 0
    again = BatchWriter(store, WriterCfg(flush_interval_ms=60_000), str(spool))
    await again.start()
    assert await store.count_requests() == 20_000
    await again.close()
    assert segments(spool) == []


async def test_a_drain_that_times_out_with_rows_only_in_memory_says_what_it_lost(tmp_path, store, wlog):
    writer = BatchWriter(
        store,
        WriterCfg(flush_interval_ms=60_000, drain_timeout=0.005, spool_max_bytes=1),
        str(tmp_path / "spool"),
    )
    await writer.start()
    for row in rows(20_000):
        writer.put(row)  # the journal is full: all held in memory
    await writer.close()
    assert not writer.alive
    assert wlog.of("writer drain timed out") == [
        ("ERROR", "writer drain timed out", {"table": "requests", "queued": 20_000})
    ]
    stored = await store.count_requests()
    assert 0 < stored < 20_000 and writer.dropped > 0 and stored + writer.dropped >= 20_000
    assert wlog.of("rows lost at shutdown: neither the store nor the journal could take them") == [
        (
            "ERROR",
            "rows lost at shutdown: neither the store nor the journal could take them",
            {"table": "requests", "rows": writer.dropped},
        )
    ]


async def test_close_also_drains_the_rows_that_arrive_during_the_drain(tmp_path, store):
    writer = BatchWriter(store, WriterCfg(flush_interval_ms=60_000), str(tmp_path / "spool"))
    await writer.start()
    for row in rows(5000):
        writer.put(row)
    late = rows(5)

    async def arrive() -> None:
        while writer.written == 0:  # the first batch is in; nine more to go
            await asyncio.sleep(0)
        for row in late:
            writer.put(row)

    arriving = asyncio.create_task(arrive())
    started = time.monotonic()
    await writer.close()
    await arriving
    assert await store.count_requests() == 5005 and time.monotonic() - started < 10
    assert segments(tmp_path / "spool") == []


@pytest.mark.parametrize("arriving", [2, 4])
async def test_rows_taken_by_a_failed_flush_go_back_to_memory_behind_the_room_left(tmp_path, store, wlog, arriving):
    """No journal, queue_size 4: a flush takes the 4 held rows; while it retries them one by one (the first is
    poison) new rows arrive and the store goes away. The new rows stay; of the taken ones only what fits in
    queue_size goes back to memory, the rest are dropped and counted."""
    await refuse_poison(f"sqlite:///{tmp_path}/s.db")
    writer = BatchWriter(store, WriterCfg(spool=False, queue_size=4, flush_interval_ms=10_000), str(tmp_path / "sp"))
    await writer.start()
    taken = rows(4)
    taken[0] = {**taken[0], "model": "poison"}
    for row in taken:
        writer.put(row)
    lockers: list[sqlite3.Connection] = []

    async def arrive_and_lock() -> None:
        while writer.written == 0:  # a good row is in: the row-by-row retry is under way
            await asyncio.sleep(0)
        for row in rows(arriving):
            writer.put(row)
        lockers.append(lock(tmp_path))

    task = asyncio.create_task(arrive_and_lock())
    await writer.flush()
    await task
    room = 4 - arriving
    assert writer.status() == {
        "store": "down",
        "journal": "off",
        "held_rows": 4,
        "spool_bytes": 0,
        "dropped_rows": 4 - room,
    }
    assert wlog.of(
        "rows dropped: neither the journal nor the store can take them and writer.queue_size is reached"
    ) == [
        (
            "ERROR",
            "rows dropped: neither the journal nor the store can take them and writer.queue_size is reached",
            {"table": "requests", "held": 4},
        )
    ]
    unlock(lockers[0])
    await writer.close()
    assert await store.count_requests() == 2 + arriving  # two good rows went in before the lock; the new ones
