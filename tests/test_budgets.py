"""Token budgets per period (#17, one replica): reserve at admission, reconcile to real usage, 429
`insufficient_quota` with `retry-after` at the period's end, a new period starts afresh, what was spent is read
back from the store after a restart, and every place that shows a key shows what is left."""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import psycopg
import pytest

from sidecar.limits.borrowing import IDLE
from sidecar.limits.periods import period_bounds, valid_period
from tests.support.processes import cli
from tests.support.stores import opened, rows

ADMIN = "budget-admin-token"
AUTH = {"authorization": f"Bearer {ADMIN}"}
USED = 11 + 5  # the fake upstream's usage per chat answer: 11 prompt tokens, 5 completion tokens


def at(text: str, tz: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "tz", "start", "end"),
    [
        ("day", "2026-03-29T12:00", "Europe/Berlin", "2026-03-29T00:00", "2026-03-30T00:00"),  # a 23-hour day
        ("week", "2026-11-29T23:59", "UTC", "2026-11-23T00:00", "2026-11-30T00:00"),  # Sunday: Monday's week
        ("week", "2026-11-30T00:00", "UTC", "2026-11-30T00:00", "2026-12-07T00:00"),
        ("month", "2026-12-31T23:00", "America/New_York", "2026-12-01T00:00", "2027-01-01T00:00"),
        ("month", "2026-02-10T08:00", "UTC", "2026-02-01T00:00", "2026-03-01T00:00"),
    ],
)
def test_calendar_periods_begin_at_local_midnight(period, now, tz, start, end):
    assert period_bounds(period, at(now, tz), ZoneInfo(tz)) == (at(start, tz), at(end, tz))


def test_duration_periods_are_aligned_windows():
    assert period_bounds("10m", 1_000_000_123.0, ZoneInfo("UTC")) == (999_999_600.0, 1_000_000_200.0)
    assert valid_period("10m") and valid_period("month") and not valid_period("fortnight") and not valid_period("0s")


async def chat(session, url, key, max_tokens=20):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    async with session.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json(), r.headers


async def make_key(session, url, **fields):
    async with session.post(url + "/admin/keys", json={"name": "b", **fields}, headers=AUTH) as r:
        body = await r.json()
        assert r.status == 201, body
        return body["key"], body["id"]


async def test_a_budget_stops_admission_and_says_when_it_resets(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        key, kid = await make_key(s, running.url, budget_tokens=100, budget_period="1h")
        accepted = 0
        while True:
            status, body, headers = await chat(s, running.url, key)
            if status != 200:
                break
            accepted += 1
            assert accepted < 20
            await running.stored(accepted)  # settled: what it did not use is back before the next one asks
        assert status == 429 and body["error"]["type"] == "insufficient_quota"
        assert body["error"]["code"] == "insufficient_quota"
        _, end = period_bounds("1h", time.time(), ZoneInfo("UTC"))
        assert abs(int(headers["retry-after"]) - math.ceil(end - time.time())) <= 2
        need = int(re.search(r"this request reserves (\d+)", body["error"]["message"]).group(1))
        assert need >= 20 and accepted * USED + need > 100 >= (accepted - 1) * USED + need  # exactly where it stops
        async with s.get(running.url + f"/admin/keys/{kid}", headers=AUTH) as r:
            shown = await r.json()
        assert shown["budget_remaining"] == 100 - accepted * USED and shown["budget_resets_at"] == end
        async with s.get(running.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}) as r:
            own = await r.json()
        assert own["budget_remaining"] == 100 - accepted * USED and own["budget_resets_at"] == end
        rows = await running.stored(accepted + 1)
    assert [r["outcome"] for r in rows].count("rate_limited") == 1
    assert sum(r["total_tokens"] or 0 for r in rows) == accepted * USED


async def test_a_new_period_starts_afresh(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        key, _ = await make_key(s, running.url, budget_tokens=40, budget_period="3s")
        _, end = period_bounds("3s", time.time(), ZoneInfo("UTC"))
        if end - time.time() < 1.5:  # room for two requests in this window
            await asyncio.sleep(end - time.time() + 0.05)
            _, end = period_bounds("3s", time.time(), ZoneInfo("UTC"))
        assert (await chat(s, running.url, key))[0] == 200
        status, body, headers = await chat(s, running.url, key)  # 16 spent + a 20-token answer reserved > 40
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert int(headers["retry-after"]) <= 3
        await asyncio.sleep(end - time.time() + 0.05)
        assert (await chat(s, running.url, key))[0] == 200  # the next window


async def test_what_was_spent_is_read_back_after_a_restart(fake, sidecar_factory, tmp_path):
    first = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        key, kid = await make_key(s, first.url, budget_tokens=1000, budget_period="day")
        for _ in range(3):
            assert (await chat(s, first.url, key))[0] == 200
        await first.stored(3)
        await first.server.drain()
        second = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
        assert (await chat(s, second.url, key))[0] == 200
        await second.stored(4)  # what is left is what the stored rows say
        async with s.get(second.url + f"/admin/keys/{kid}", headers=AUTH) as r:
            assert (await r.json())["budget_remaining"] == 1000 - 4 * USED
    await second.stored(4)
    shown = orjson.loads(cli(tmp_path, "keys", "show", kid, db=f"sqlite:///{tmp_path}/sidecar.db").stdout)
    assert shown["budget_remaining"] == 1000 - 4 * USED and shown["budget_resets_time"].endswith("Z")


async def test_a_request_refused_by_the_minute_limits_gives_its_budget_back(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        key, kid = await make_key(s, running.url, budget_tokens=1000, budget_period="day", rpm=1)
        assert (await chat(s, running.url, key))[0] == 200
        status, body, _ = await chat(s, running.url, key)
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
        await running.stored(2)
        async with s.get(running.url + f"/admin/keys/{kid}", headers=AUTH) as r:
            assert (await r.json())["budget_remaining"] == 1000 - USED  # nothing held for the refused one


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"budget_tokens": 10}, "budget_period"),
        ({"budget_period": "day"}, "budget_period"),
        ({"budget_tokens": -1, "budget_period": "day"}, "budget_tokens"),
        ({"budget_tokens": 10, "budget_period": "fortnight"}, "budget_period"),
    ],
)
async def test_budget_fields_are_checked(fake, sidecar_factory, fields, param):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/admin/keys", json={"name": "x", **fields}, headers=AUTH) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == param


async def test_cli_sets_and_removes_a_budget(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, store__url="", server__data_dir=str(tmp_path), server__admin_token=ADMIN
    )
    made = cli(tmp_path, "keys", "create", "--name", "capped", "--budget-tokens", "500", "--budget-period", "month")
    assert made.returncode == 0, made.stderr
    shown = orjson.loads(cli(tmp_path, "keys", "show", "capped").stdout)
    assert shown["budget_tokens"] == 500 and shown["budget_period"] == "month" and shown["budget_remaining"] == 500
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, running.url, made.stdout.strip()))[0] == 200
    await running.stored(1)
    assert orjson.loads(cli(tmp_path, "keys", "show", "capped").stdout)["budget_remaining"] == 500 - USED
    cleared = orjson.loads(cli(tmp_path, "keys", "update", "capped", "--no-budget").stdout)
    assert cleared["budget_tokens"] is None and cleared["budget_period"] is None
    half = cli(tmp_path, "keys", "update", "capped", "--budget-tokens", "5")
    assert half.returncode == 1 and "set together" in half.stderr


def lock_waiters(pg_url: str) -> int:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        query = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        return int(conn.execute(query).fetchone()[0])


def budget_state(pg_url: str, kid: str) -> tuple[float, int]:
    """(the budget balance's level, tokens the key's stored rows used)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        level = conn.execute("SELECT SUM(level) FROM limit_balances WHERE key_id = %s AND dim = 'budget'", (kid,))
        spent = conn.execute("SELECT COALESCE(SUM(total_tokens), 0) FROM request_log WHERE key_id = %s", (kid,))
        return float(level.fetchone()[0]), int(spent.fetchone()[0])


async def test_a_request_during_an_idle_give_back_is_charged(fake, sidecar_factory, pg_url):
    """The idle allowance is on its way back to the store (held there by a lock this test takes on the balance's
    row) when a request comes: the request must not spend from it, uncharged, but borrow anew; once everything
    is idle again the balance is the budget less what the rows used."""
    budget = 1000
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=pg_url)
    async with aiohttp.ClientSession() as s:
        key, kid = await make_key(s, running.url, budget_tokens=budget, budget_period="month")
        assert (await chat(s, running.url, key))[0] == 200
        await running.stored(1)
        with psycopg.connect(pg_url) as lock:
            lock.execute("SELECT level FROM limit_balances WHERE key_id = %s FOR UPDATE", (kid,))
            deadline = time.monotonic() + IDLE * 3
            while lock_waiters(pg_url) < 1:  # the idle sweep's give-back waits for the row (IDLE, then a sweep)
                assert time.monotonic() < deadline, "no give-back came"
                await asyncio.sleep(0.05)
            second = asyncio.create_task(chat(s, running.url, key))
            while not second.done() and lock_waiters(pg_url) < 2:  # spent from the share, or a borrow waits too
                assert time.monotonic() < deadline + IDLE, "the second request neither ended nor waited"
                await asyncio.sleep(0.05)
            lock.commit()
        assert (await second)[0] == 200
        async with s.get(running.url + "/metrics") as r:
            borrows = re.search(r"^sidecar_limit_borrows_total (\S+)$", await r.text(), re.M).group(1)
        assert float(borrows) == 2  # the second request borrowed anew: the first share was on its way back
        await running.stored(2)
        deadline = time.monotonic() + IDLE * 3
        while (state := budget_state(pg_url, kid)) != (budget - 2 * USED, 2 * USED):
            assert time.monotonic() < deadline, state  # every allowance back: the balance is what the rows leave
            await asyncio.sleep(0.25)


def tables(store_url: str, key_id: str) -> tuple[float, float]:
    """(the key's budget balance level, what replicas hold of it), read beside the store."""
    sql = (
        "SELECT (SELECT SUM(level) FROM limit_balances WHERE key_id = {p}), "
        "(SELECT COALESCE(SUM(outstanding), 0) FROM limit_holders WHERE key_id = {p})"
    )
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
            row = db.execute(sql.format(p="?"), (key_id, key_id)).fetchone()
    else:
        with psycopg.connect(store_url) as db:
            row = db.execute(sql.format(p="%s"), (key_id, key_id)).fetchone()
    return float(row[0]), float(row[1])


async def test_stored_rows_are_charged_once_to_the_writers_holding_or_else_the_balance(store_url):
    """The budget's figure is kept, not summed: the balance plus what replicas hold is the budget less what the
    stored rows used. A row is charged to the holding of the replica that stores it (what it borrowed less what
    its rows used), a row stored by a replica holding nothing (a journal replayed after a restart) to the
    balance, a batch stored twice once; a holding given back leaves the balance exact."""
    now = time.time()
    period = (now - 60, now + 3600)
    one, other = await opened(store_url), await opened(store_url)  # two replicas
    try:
        assert await one.budget_left("k", "b", 1000, period) == 1000  # made from the rows: none yet
        granted, left = await one.borrow_budget("k", "b", 1000, period, 40, 0.125, 10.0)
        assert (granted, left) == (125, 875) and tables(store_url, "k") == (875, 125)
        batch = [{**row, "key_id": "k", "total_tokens": USED} for row in rows(3)]
        lines = [orjson.dumps(row) for row in batch]
        for _ in range(2):  # the second time: a replayed batch, already stored
            await one.insert_requests(lines)
            assert tables(store_url, "k") == (875, 125 - 3 * USED)
        await other.insert_requests([orjson.dumps({**row, "key_id": "k", "total_tokens": USED}) for row in rows(2)])
        assert tables(store_url, "k") == (875 - 2 * USED, 125 - 3 * USED)
        assert await one.budget_left("k", "b", 1000, period) == 1000 - 5 * USED
        await one.give_back("k", "budget", "b", 125 - 3 * USED, lease=10.0)
        assert tables(store_url, "k") == (1000 - 5 * USED, 0)
    finally:
        await one.close()
        await other.close()
