"""Token budgets per period (#17, one replica): reserve at admission, reconcile to real usage, 429
`insufficient_quota` with `retry-after` at the period's end, a new period starts afresh, what was spent is read
back from the store after a restart, and every place that shows a key shows what is left."""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest

from sidecar.limits.periods import period_bounds, valid_period
from tests.support.processes import cli

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
