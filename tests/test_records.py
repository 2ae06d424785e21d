"""One exact request_log row per request, on SQLite and PostgreSQL alike (the `store_url` fixture runs both)."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from sidecar.app import LIMITS, PROXY
from tests.support.waits import wait_for

ADMIN = "admin-token-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there friend"}], "max_tokens": 50}


@pytest.fixture
async def rec_sidecar(fake, sidecar_factory, store_url):
    return await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=store_url, upstream__first_byte_timeout=0.5
    )


async def new_key(s, url, **fields):
    async with s.post(
        url + "/admin/keys", json={"name": "r", **fields}, headers={"authorization": f"Bearer {ADMIN}"}
    ) as r:
        doc = await r.json()
        return doc["key"], doc["id"]


async def call(s, url, key, body, headers=None):
    async with s.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}", **(headers or {})}
    ) as r:
        return r.status, await r.read(), r.headers.get("x-request-id")


async def test_row_content_for_every_outcome(fake, rec_sidecar):
    url = rec_sidecar.url
    expected = {}
    async with aiohttp.ClientSession() as s:
        key, kid = await new_key(s, url, rpm=7)
        # completed, non-streaming, cached tokens reported
        fake.script.cached_tokens = 4
        _, _, rid = await call(s, url, key, CHAT)
        expected[rid] = dict(
            outcome="completed",
            status=200,
            stream=False,
            prompt_tokens=11,
            completion_tokens=5,
            total_tokens=16,
            cached_tokens=4,
            usage_source="upstream",
        )
        fake.script.cached_tokens = None
        # completed, streaming, client asked for usage
        _, body, rid = await call(s, url, key, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert b'"choices":[]' in body
        expected[rid] = dict(outcome="completed", status=200, stream=True, completion_tokens=5, usage_source="upstream")
        # completed, streaming, usage asked for by the sidecar and hidden
        _, body, rid = await call(s, url, key, {**CHAT, "stream": True})
        assert b'"choices":[]' not in body and body.endswith(b"data: [DONE]\n\n")
        expected[rid] = dict(
            outcome="completed", stream=True, prompt_tokens=11, completion_tokens=5, usage_source="upstream"
        )
        # streaming from an upstream that never sends usage: counted, prompt from the estimate
        _, _, rid = await call(
            s,
            url,
            key,
            {**CHAT, "stream": True},
            {"x-fake-script": orjson.dumps({"usage": False, "chunks": 7}).decode()},
        )
        expected[rid] = dict(outcome="completed", completion_tokens=7, usage_source="counted")
        # upstream 500, mid-stream drop, first-byte timeout
        _, _, rid = await call(s, url, key, CHAT, {"x-fake-script": '{"status": 500}'})
        expected[rid] = dict(outcome="upstream_error", status=500, upstream_status=500)
        _, _, rid = await call(s, url, key, {**CHAT, "stream": True}, {"x-fake-script": '{"drop_after": 2}'})
        expected[rid] = dict(
            outcome="upstream_error",
            status=200,
            error_code="upstream_dropped",
            completion_tokens=2,
            usage_source="counted",
        )
        _, _, rid = await call(s, url, key, CHAT, {"x-fake-script": '{"delay_headers": 3}'})
        expected[rid] = dict(outcome="upstream_timeout", status=504)
        # bad request and unauthorized take no lease; rate limited: the 8th leased request (rpm=7)
        _, _, rid = await call(s, url, key, {"model": 7})
        expected[rid] = dict(outcome="bad_request", status=400, key_id=kid)
        _, _, rid = await call(s, url, "sk-wrong", CHAT)
        expected[rid] = dict(outcome="unauthorized", status=401, key_id=None)
        _, _, rid = await call(s, url, key, CHAT)
        expected[rid] = dict(outcome="rate_limited", status=429, error_code="rate_limit_exceeded")
    rows = {r["request_id"]: r for r in await rec_sidecar.stored(len(expected))}
    assert set(rows) == set(expected)
    for rid, want in expected.items():
        got = {k: rows[rid][k] for k in want}
        assert got == {**want}, rid
    assert all(r["latency_ms"] >= 0 and r["finished_at"] >= r["started_at"] for r in rows.values())
    counted = next(r for r in rows.values() if r["usage_source"] == "counted" and r["outcome"] == "completed")
    assert counted["prompt_tokens"] >= 5  # the reservation estimate for the prompt


async def test_disconnect_after_k_chunks_is_one_counted_row(fake, rec_sidecar):
    async with aiohttp.ClientSession() as s:
        key, _ = await new_key(s, rec_sidecar.url)
    fake.script.chunks, fake.script.delay_chunks = 100, 0.02
    body = {**CHAT, "stream": True}
    reader, writer = await open_stream_auth(rec_sidecar.port, body, key)
    seen = b""
    while seen.count(b"tok") < 10:
        seen += await reader.read(65536)
    writer.transport.abort()
    rows = await rec_sidecar.stored(1)
    await asyncio.sleep(0.3)
    rows = await rec_sidecar.stored(1)
    assert len(rows) == 1
    row = rows[0]
    assert (row["outcome"], row["status"], row["usage_source"]) == ("client_disconnected", 499, "counted")
    assert 10 <= row["completion_tokens"] <= 15
    assert rec_sidecar.server.app[LIMITS].local.totals() == (0, 0)


async def test_cut_between_last_content_and_usage_chunk(fake, rec_sidecar):
    async with aiohttp.ClientSession() as s:
        key, _ = await new_key(s, rec_sidecar.url)
    fake.script.chunks, fake.script.delay_before_usage = 6, 5
    reader, writer = await open_stream_auth(rec_sidecar.port, {**CHAT, "stream": True}, key)
    seen = b""
    while b'"finish_reason":"stop"' not in seen:
        seen += await reader.read(65536)
    writer.transport.abort()
    row = (await rec_sidecar.stored(1))[0]
    assert row["outcome"] == "client_disconnected" and row["completion_tokens"] == 6


async def open_stream_auth(port, body, key):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    await writer.drain()
    return reader, writer


async def test_reading_usage_everywhere(fake, rec_sidecar):
    url = rec_sidecar.url
    async with aiohttp.ClientSession() as s:
        key_a, kid_a = await new_key(s, url)
        key_b, kid_b = await new_key(s, url)
        for _ in range(3):
            await call(s, url, key_a, CHAT)
        await call(s, url, key_b, {**CHAT, "model": "other"})
        await call(s, url, key_b, {"model": 1})
        await rec_sidecar.stored(5)
        auth = {"authorization": f"Bearer {ADMIN}"}
        async with s.get(url + "/admin/usage?by=key&since=1h", headers=auth) as r:
            by_key = {row["key"]: row for row in (await r.json())["data"]}
        assert by_key[kid_a]["requests"] == 3 and by_key[kid_a]["completion_tokens"] == 15
        assert by_key[kid_b]["requests"] == 2 and by_key[kid_b]["failed"] == 1
        async with s.get(url + "/admin/usage?by=model", headers=auth) as r:
            assert {row["model"] for row in (await r.json())["data"]} >= {"m", "other"}
        async with s.get(url + "/admin/usage?by=day", headers=auth) as r:
            assert len((await r.json())["data"]) == 1
        # paginated listing with filters
        async with s.get(f"{url}/admin/requests?key_id={kid_a}&limit=2", headers=auth) as r:
            page1 = await r.json()
        async with s.get(
            f"{url}/admin/requests?key_id={kid_a}&limit=2&before={page1['next_before']}", headers=auth
        ) as r:
            page2 = await r.json()
        ids = [x["request_id"] for x in page1["data"] + page2["data"]]
        assert len(ids) == 3 == len(set(ids)) and page2["next_before"] is None
        async with s.get(f"{url}/admin/requests?outcome=bad_request", headers=auth) as r:
            assert [x["key_id"] for x in (await r.json())["data"]] == [kid_b]
        async with s.get(url + "/admin/requests?limit=0", headers=auth) as r:
            assert r.status == 400
        # a key holder sees only their own usage
        async with s.get(url + "/v1/usage", headers={"authorization": f"Bearer {key_a}"}) as r:
            own = await r.json()
        assert own["key_id"] == kid_a and own["data"] == [
            {
                "model": "m",
                "requests": 3,
                "prompt_tokens": 33,
                "completion_tokens": 15,
                "total_tokens": 48,
                "cached_tokens": 0,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "failed": 0,
            }
        ]
        async with s.get(url + "/v1/usage") as r:
            assert r.status == 401


async def test_store_down_rows_spool_and_replay_exactly_once(fake, sidecar_factory, pg_server, pg_url):
    running = await sidecar_factory(fake.url, store__url=pg_url)
    async with aiohttp.ClientSession() as s:

        async def burst(n):
            for _ in range(n):
                async with s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200

        await burst(20)
        await running.stored(20)
        pg_server.stop()
        try:
            await burst(50)  # served while PostgreSQL is down
            await asyncio.sleep(0.5)
            spool = list(
                (
                    running.server.settings.server.data_dir
                    and __import__("pathlib").Path(running.server.settings.server.data_dir, "spool")
                ).glob("requests.*.jsonl")
            )
            assert spool, "rows should be spooled while the store is down"
        finally:
            pg_server.start()
        await burst(10)
    rows = await running.stored(80, timeout=30)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == 80 == len(set(ids))
    assert {r["request_id"] for r in running.rows} == set(ids)


async def test_poison_row_among_good_ones(store_url, tmp_path):
    from sidecar.config import WriterCfg
    from sidecar.records.record import RequestRecord
    from sidecar.records.writer import BatchWriter
    from sidecar.store import open_store

    store = open_store(store_url)
    await store.open()
    await store.migrate()
    writer = BatchWriter(store, WriterCfg(max_rows=500, flush_interval_ms=10_000), str(tmp_path / "spool"))
    await writer.start()
    rows = []
    for i in range(100):
        rec = RequestRecord.start("POST", "/v1/chat/completions")
        rec.status, rec.model = 200, "m"
        rows.append(rec.finish().as_row())
    rows[40]["model"] = "bad\ud800surrogate"
    rows[41]["prompt_tokens"] = 2**70
    for row in rows:
        writer.put(row)
    await writer.flush()
    assert await store.count_requests() == 100  # the two poison rows were sanitised and stored
    stored = {
        r["request_id"]: r
        for r in await store.requests(__import__("sidecar.store.base").store.base.RequestQuery(limit=200))
    }
    assert stored[rows[40]["request_id"]]["model"] == "bad?surrogate"
    assert stored[rows[41]["request_id"]]["prompt_tokens"] is None
    writer.put({**rows[0], "request_id": "req_after"})  # still alive
    await writer.close()
    assert await store.count_requests() == 101
    await store.close()


async def test_shutdown_cancel_records_every_request(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    fake.script.chunks, fake.script.delay_chunks = 200, 0.02
    proxy = running.server.app[PROXY]
    async with aiohttp.ClientSession() as s:

        async def one():
            async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                return await r.read()

        tasks = [asyncio.create_task(one()) for _ in range(5)]
        await wait_for(lambda: len(proxy.in_flight.tasks) == 5)
        await asyncio.sleep(0.1)
        proxy.in_flight.cancel_all()
        bodies = await asyncio.gather(*tasks)
    for body in bodies:
        assert b"server_shutting_down" in body and b"[DONE]" not in body
    rows = await running.stored(5)
    assert [r["outcome"] for r in rows] == ["shutdown"] * 5


async def test_usage_cli_formats(fake, sidecar_factory, tmp_path):
    import csv
    import io
    import os
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path}/u.db"
    running = await sidecar_factory(fake.url, store__url=db)
    async with aiohttp.ClientSession() as s:
        for model in ("a", "a", "b"):
            async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "model": model}) as r:
                assert r.status == 200
    await running.stored(3)
    env = {**os.environ, "SIDECAR_STORE_URL": db, "SIDECAR_SERVER_DATA_DIR": str(tmp_path)}

    def cli(*args):
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", "usage", "--since", "1h", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    as_json = orjson.loads(cli("--by", "model", "--format", "json"))
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in as_json] == [("a", 2, 10), ("b", 1, 5)]
    as_csv = list(csv.DictReader(io.StringIO(cli("--by", "model", "--format", "csv"))))
    assert [(r["model"], r["requests"]) for r in as_csv] == [("a", "2"), ("b", "1")]
    table = cli("--by", "day").splitlines()
    assert table[0].split()[:2] == ["day", "requests"] and table[1].split()[1] == "3"
