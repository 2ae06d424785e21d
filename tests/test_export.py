"""Usage export (`[export]`, sidecar/records/export.py): stored rows go out as CloudEvents batches to a real
receiver that validates each event with the `cloudevents` SDK; every row at least once, none missing, through a
receiver that fails for a while, one that refuses (4xx), a restart, a store outage, rows stored late with an
older time, a PostgreSQL transaction that commits late, and two replicas on one store. `sidecar usage export`
writes the same events."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import aiohttp
import orjson
import psycopg
import pytest

from sidecar.config import ConfigError, ExportCfg, load
from sidecar.records.export import Exporter
from tests.support.bodies import CHAT
from tests.support.clients import ADMIN, admin, post
from tests.support.cloudevents_receiver import Receiver, parse
from tests.support.faults import through
from tests.support.stores import opened, rows
from tests.support.waits import wait_for

FAST = {"export__interval": 0.05, "export__max_backoff": 0.2}


@pytest.fixture
async def events():
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()


async def chats(url: str, n: int, key: str | None = None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    for _ in range(n):
        await post(url + "/v1/chat/completions", CHAT, headers)


async def delivered(events: Receiver, ids: set[str], timeout: float = 20.0) -> None:
    await wait_for(lambda: ids <= set(events.ids), timeout, lambda: f"missing: {sorted(ids - set(events.ids))[:5]}")


def exporter(store, events: Receiver, **cfg) -> Exporter:
    return Exporter(store, ExportCfg(url=events.url, **{"interval": 0.05, "max_backoff": 0.2, **cfg}), "")


async def test_every_stored_row_goes_out_as_a_valid_cloudevent(fake, sidecar_factory, store_url, events, tmp_path):
    token = tmp_path / "export-token"
    token.write_text("export-token-canary-77\n")
    sc = await sidecar_factory(
        fake.url, store__url=store_url, auth__enabled=True, server__admin_token=ADMIN, export__url=events.url,
        export__token_file=str(token), export__batch_size=7, **FAST,
    )  # fmt: skip
    async with aiohttp.ClientSession() as s:
        status, created, _ = await admin(s, "POST", sc.url + "/admin/keys", {"name": "alpha"})
    assert status == 201
    await chats(sc.url, 12, created["key"])
    await chats(sc.url, 2)  # refused (401): rows without a key
    stored = await sc.stored(expect=14)
    await delivered(events, {r["request_id"] for r in stored})
    assert events.repeats() == 0 and not events.invalid and events.posts >= 2  # 14 rows, 7 a batch
    assert events.authorization == {"Bearer export-token-canary-77"}
    assert "export-token-canary-77" not in sc.log_text()
    by_id = {str(e.get_id()): e for e in events.events}
    for row in stored:
        ev = by_id[row["request_id"]]
        assert (ev.get_source(), ev.get_type()) == ("sidecar", "sidecar.request")
        assert ev.get_subject() == (row["key_id"] or "anonymous")
        assert abs(ev.get_time().timestamp() - row["started_at"]) < 1e-3
        data = ev.get_data()
        assert (data["status"], data["outcome"], data["model"], data["path"]) == (
            row["status"], row["outcome"], row["model"], row["path"],
        )  # fmt: skip
        for name in ("prompt_tokens", "completion_tokens"):
            assert data[name] == (row[name] or 0)
        for name in ("cached_tokens", "cache_write_tokens", "reasoning_tokens"):
            assert data[name] == row[name]  # null where the upstream said nothing, as on the row
        assert data["total_tokens"] == (row["total_tokens"] or 0) and data["duration_ms"] >= 0
    keyed = [by_id[r["request_id"]] for r in stored if r["status"] == 200]
    assert len(keyed) == 12 and all(e.get_subject() == created["id"] for e in keyed)
    assert all(e.get_data()["total_tokens"] > 0 for e in keyed)


async def test_a_receiver_that_fails_for_a_while_gets_every_row_once_it_recovers(fake, sidecar_factory, events):
    events.failing = True  # 503 to every POST
    sc = await sidecar_factory(fake.url, export__url=events.url, export__batch_size=5, **FAST)
    await chats(sc.url, 12)
    await wait_for(lambda: events.refused >= 4, 10.0)
    async with aiohttp.ClientSession() as s, s.get(sc.url + "/metrics") as r:
        page = await r.text()
    assert 'sidecar_export_failures_total{reason="5xx"}' in page
    events.failing = False
    await delivered(events, {r["request_id"] for r in await sc.stored(expect=12)})
    assert events.repeats() == 0 and len(events.ids) == 12


async def test_a_429_is_retried_after_the_time_it_asks_for(store_url, events):
    store = await opened(store_url)
    await store.insert_requests([orjson.dumps(r) for r in rows(3)])
    events.fail_with, events.fail_for, events.retry_after = 429, 1, "1"
    ex = exporter(store, events, max_backoff=5.0)
    try:
        await ex.start()
        await wait_for(lambda: len(events.ids) == 3, 10.0)
        assert ex.failures["throttled"] == 1
    finally:
        await ex.close()
        await store.close()


async def test_a_refusal_is_logged_once_and_held_never_skipped(store_url, events, log_catcher):
    """A 4xx other than 408/429 (a wrong token, say): nothing is skipped; the batch waits for the receiver to take
    it, retried at max_backoff, and the refusal is logged once, not per retry."""
    store = await opened(store_url)
    batch = rows(4)
    await store.insert_requests([orjson.dumps(r) for r in batch])
    events.fail_with, events.failing = 401, True
    ex = exporter(store, events, max_backoff=0.1)
    try:
        await ex.start()
        await wait_for(lambda: events.refused >= 4, 10.0)
        refusals = [line for line in log_catcher.lines if "refuses the batch" in line]
        assert len(refusals) == 1 and "401" in refusals[0]
        events.failing = False
        await delivered(events, {r["request_id"] for r in batch})
        assert events.repeats() == 0 and ex.failures["4xx"] >= 4
    finally:
        await ex.close()
        await store.close()


async def test_a_restart_in_the_middle_leaves_no_gap(fake, sidecar_factory, events):
    first = await sidecar_factory(fake.url, export__url=events.url, export__batch_size=4, **FAST)
    await chats(first.url, 6)
    await delivered(events, {r["request_id"] for r in await first.stored(expect=6)})
    events.failing = True  # the next rows cannot go out before the stop
    await chats(first.url, 6)
    await first.stored(expect=12)
    await wait_for(lambda: events.refused >= 1, 10.0)
    await first.server.runner.cleanup()
    events.failing = False
    second = await sidecar_factory(fake.url, export__url=events.url, export__batch_size=4, **FAST)
    await chats(second.url, 3)
    await delivered(events, {r["request_id"] for r in await second.stored(expect=15)})
    assert len(set(events.ids)) == 15 and events.repeats() == 0  # the stop let go of the cursor, nothing resent


async def test_a_store_outage_leaves_no_gap(fake, pg_proxy, pg_url, events, sidecar_factory):
    """PostgreSQL goes away: rows wait in the writer's spool and the export in back-off; when it is back the
    spool's rows are stored and every one of them goes out after those sent before."""
    sc = await sidecar_factory(
        fake.url, store__url=through(pg_proxy, pg_url), store__op_timeout=1.0, export__url=events.url, **FAST
    )
    await chats(sc.url, 5)
    await delivered(events, {r["request_id"] for r in await sc.stored(expect=5)})
    await pg_proxy.down()
    await chats(sc.url, 5)  # journaled in the spool
    await asyncio.sleep(0.5)  # the export's rounds meet the outage
    await pg_proxy.up()
    await delivered(events, {r["request_id"] for r in await sc.stored(expect=10, timeout=30.0)}, 30.0)
    assert len(set(events.ids)) == 10


async def test_a_row_stored_late_with_an_older_time_still_goes_out(store_url, events):
    """The spool replays rows after an outage: they reach the store after rows that started later. The cursor
    follows insertion, not time."""
    store = await opened(store_url)
    ex = exporter(store, events)
    try:
        await store.insert_requests([orjson.dumps(r) for r in rows(3)])
        await ex.round()
        assert len(events.ids) == 3
        late = rows(1)[0]
        late.update(started_at=time.time() - 3600, finished_at=time.time() - 3599)
        await store.insert_requests([orjson.dumps(late)])
        await ex.round()
        assert events.ids[-1] == late["request_id"] and len(events.ids) == 4
    finally:
        await ex.close()
        await store.close()


async def test_a_transaction_that_commits_late_is_not_passed(pg_url, events):
    """PostgreSQL: transaction A inserts a row and commits only after B inserted and committed one. A cursor on
    insertion order alone would send B's row, move past A's and never send it. The export waits for A."""
    store = await opened(pg_url)
    ex = exporter(store, events)
    a, b = rows(2)
    cols = ", ".join(a)
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as slow:
            await slow.execute(
                f"INSERT INTO request_log ({cols}) SELECT {cols} FROM json_populate_record(NULL::request_log, %s)",
                [orjson.dumps(a).decode()],
            )  # open: not committed
            await store.insert_requests([orjson.dumps(b)])
            await ex.round()
            assert events.ids == []  # B's row waits behind A's open transaction
            await slow.commit()
        await ex.round()
        assert events.ids == [a["request_id"], b["request_id"]]
    finally:
        await ex.close()
        await store.close()


async def test_two_replicas_export_one_at_a_time_and_the_second_takes_over(pg_url, events):
    first, second = await opened(pg_url), await opened(pg_url)
    one, two = exporter(first, events, batch_size=3), exporter(second, events, batch_size=3)
    try:
        batch = rows(5)
        await first.insert_requests([orjson.dumps(r) for r in batch])
        await one.round()
        await two.round()  # the first holds the cursor: the second sends nothing
        assert (one.leading, two.leading) == (True, False) and len(events.ids) == 5
        more = rows(4)
        await second.insert_requests([orjson.dumps(r) for r in more])
        await two.round()
        assert len(events.ids) == 5
        await one.close()  # stops: lets go of the cursor
        await two.round()
        assert two.leading and sorted(events.ids) == sorted(r["request_id"] for r in batch + more)
        assert events.repeats() == 0
    finally:
        await one.close()
        await two.close()
        await first.close()
        await second.close()


async def test_a_holder_that_lost_its_lease_cannot_move_the_cursor_back(store_url):
    store = await opened(store_url)
    try:
        assert await store.export_claim("usage", "r1", 60.0) == ""
        assert await store.export_claim("usage", "r2", 60.0) is None  # r1's lease runs
        assert await store.export_advance("usage", "r1", "", "5", -1.0)  # and now it has run out
        assert await store.export_claim("usage", "r2", 60.0) == "5"
        assert not await store.export_advance("usage", "r1", "5", "9", 60.0)  # r1 lost it: no move
        assert await store.export_claim("usage", "r2", 60.0) == "5"
    finally:
        await store.close()


async def test_the_cli_writes_the_same_events(store_url, tmp_path):
    store = await opened(store_url)
    batch = rows(7)
    batch[0]["key_id"] = "k_cli"
    batch[1]["started_at"] = time.time() - 7200  # outside --since 1h
    await store.insert_requests([orjson.dumps(r) for r in batch])
    await store.close()
    env = {**os.environ, "SIDECAR_STORE_URL": store_url, "SIDECAR_SERVER_DATA_DIR": str(tmp_path)}
    env["SIDECAR_EXPORT_SOURCE"] = "billing-eu"
    cmd = [sys.executable, "-m", "sidecar", "usage", "export", "--since", "1h", "--format", "cloudevents"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    parsed = [parse(orjson.loads(line)) for line in out.stdout.splitlines()]
    expected = [r for i, r in enumerate(batch) if i != 1]
    assert sorted(str(e.get_id()) for e in parsed) == sorted(r["request_id"] for r in expected)
    assert {e.get_source() for e in parsed} == {"billing-eu"} and parsed[0].get_subject() == "k_cli"
    assert "6 usage events" in out.stderr
    refused = subprocess.run([*cmd[:-1], "csv"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "cloudevents" in refused.stderr


def test_export_settings_are_checked():
    for flags, why in (
        ({"export.url": "ftp://x"}, "export.url: must start with http"),
        ({"export.batch_size": 0}, "export.batch_size: must be greater than 0"),
        ({"export.batch_size": 20000}, "export.batch_size: at most 10000"),
        ({"export.source": " "}, "export.source: must not be empty"),
        ({"export.max_backoff": 0}, "export.max_backoff: must be greater than 0"),
    ):
        with pytest.raises(ConfigError, match=why):
            load(None, {}, flags)
    assert load(None, {"SIDECAR_EXPORT_URL": "https://openmeter.example/api/v1/events"}, {}).export.url
