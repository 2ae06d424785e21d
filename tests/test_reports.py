"""Usage reports cannot stall the proxy: they run on a connection of their own (key lookups and /readyz never
queue behind them), reach back at most `store.report_max_days`, stop at `store.report_timeout`, and count
against the caller's own limits."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import aiohttp
import psycopg
import pytest

from tests.support.clients import ADMIN, admin

ROWS = {"sqlite": 300_000, "postgres": 2_000_000}  # enough for the reports to take over a second
DAY = 86400


def fill_sqlite(path: str, key_id: str, n: int) -> None:
    now = time.time()
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO request_log (request_id, key_id, method, path, model, stream, status, outcome, "
            "prompt_tokens, completion_tokens, total_tokens, usage_source, latency_ms, bytes_in, bytes_out, chunks, "
            "started_at, finished_at) VALUES (?, ?, 'POST', '/v1/chat/completions', ?, 0, 200, 'completed', "
            "10, 5, 15, 'upstream', 1.0, 10, 10, 0, ?, ?)",
            ((f"req_fill_{i:08d}", key_id, f"m{i % 7}", now - (i % 360) * DAY, now) for i in range(n)),
        )


def fill_postgres(url: str, key_id: str, n: int) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(
            "INSERT INTO request_log (request_id, key_id, method, path, model, stream, status, outcome, "
            "prompt_tokens, completion_tokens, total_tokens, usage_source, latency_ms, bytes_in, bytes_out, chunks, "
            "started_at, finished_at) SELECT 'req_fill_' || i, %s, 'POST', '/v1/chat/completions', 'm' || mod(i, 7), "
            "false, 200, 'completed', 10, 5, 15, 'upstream', 1.0, 10, 10, 0, "
            "extract(epoch from now()) - mod(i, 360) * 86400, extract(epoch from now()) "
            "FROM generate_series(1, %s) AS i",
            (key_id, n),
        )


async def start(fake, sidecar_factory, store_url, rows=ROWS, **options):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=store_url, store__retention="0", **options
    )
    async with aiohttp.ClientSession() as s:
        _, a, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "reporter"})
        _, b, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "bystander"})
    if store_url.startswith("sqlite"):
        await asyncio.to_thread(fill_sqlite, store_url[len("sqlite:///") :], a["id"], rows["sqlite"])
    else:
        await asyncio.to_thread(fill_postgres, store_url, a["id"], rows["postgres"])
    return running, a, b


async def timed(coro):
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await coro
    return loop.time() - t0, result


@pytest.mark.slow
async def test_four_big_reports_do_not_stall_another_keys_first_request_or_readyz(fake, sidecar_factory, store_url):
    running, _, b = await start(fake, sidecar_factory, store_url)
    async with aiohttp.ClientSession() as s:

        async def report():  # the operator's year-long report (a key holder may run one at a time)
            async with s.get(
                running.url + "/admin/usage",
                params={"since": "365d", "by": "day"},
                headers={"authorization": f"Bearer {ADMIN}"},
            ) as r:
                assert r.status == 200, await r.text()
                return sum(row["requests"] for row in (await r.json())["data"])

        async def first_request():
            headers = {"authorization": f"Bearer {b['key']}"}
            async with s.post(
                running.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
            ) as r:
                assert r.status == 200

        async def readyz():
            async with s.get(running.url + "/readyz") as r:
                assert r.status == 200

        async def meanwhile(coro):
            await asyncio.sleep(0.2)  # the reports are running
            return await timed(coro)

        reports = asyncio.gather(*(report() for _ in range(4)))
        (spent, totals), (lookup, _), (ready, _) = await asyncio.gather(
            timed(reports), meanwhile(first_request()), meanwhile(readyz())
        )
    rows = ROWS["sqlite" if store_url.startswith("sqlite") else "postgres"]
    print(f"4 reports over {rows} rows: {spent:.2f} s; meanwhile first request {lookup:.3f} s, readyz {ready:.3f} s")
    assert all(rows <= total <= rows + 1 for total in totals)  # (+1: the bystander's request, if it was first)
    assert spent > 1.0  # the reports were long enough to have stalled what queued behind them
    assert lookup < 0.3 and ready < 0.3


@pytest.mark.slow
async def test_a_report_past_the_timeout_is_stopped_with_a_503(fake, sidecar_factory, store_url):
    small = {"sqlite": 100_000, "postgres": 300_000}
    running, a, _ = await start(fake, sidecar_factory, store_url, small, store__report_timeout=0.02)
    headers = {"authorization": f"Bearer {a['key']}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(running.url + "/v1/usage", params={"since": "365d", "by": "day"}, headers=headers) as r:
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "report_timeout"
        async with s.get(running.url + "/v1/usage", params={"since": "1h"}, headers=headers) as r:
            assert r.status in (200, 503)  # the store is still usable either way
        async with s.post(
            running.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
        ) as r:
            assert r.status == 200


async def test_reports_are_bounded_in_range_and_count_against_the_keys_limits(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, store__report_max_days=30)
    async with aiohttp.ClientSession() as s:
        _, key, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "r", "rpm": 2})
        headers = {"authorization": f"Bearer {key['key']}"}
        async with s.get(running.url + "/v1/usage", params={"since": "31d"}, headers=headers) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "since"
        statuses = []
        for _ in range(3):
            async with s.get(running.url + "/v1/usage", params={"since": "7d"}, headers=headers) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429]
        _, other, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "one-at-a-time"})
        others = {"authorization": f"Bearer {other['key']}"}
        started = [s.get(running.url + "/v1/usage", params={"since": "7d"}, headers=others) for _ in range(3)]
        answers = await asyncio.gather(*started)
        codes = sorted(r.status for r in answers)
        for r in answers:
            r.release()
        assert codes[0] == 200 and set(codes) <= {200, 429}
        async with s.post(
            running.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=headers
        ) as r:
            assert r.status == 429  # the same budget: reports used it up
        status, _, _ = await admin(s, "GET", running.url + "/admin/usage?since=31d")
        assert status == 400
