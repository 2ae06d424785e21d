"""Network faults between the sidecar and the upstream, and between the sidecar and PostgreSQL
(tests/support/faults.py).

Upstream: each break (RST, FIN, a connection that goes silent) at each point of a streamed response (inside
the response head, mid-stream, inside the hidden usage event), plus latency, a bandwidth cap, a late close and
the upstream going down. The client gets a clean JSON error before the first byte, or a stream that visibly
ends badly after it (an SSE error event and never a `[DONE]`), and the row says what happened. The fixture's
invariants (no lease, no request left, one row per request) hold after each.

PostgreSQL: down (connections reset and refused), silent (a blackhole mid-write), slow: requests never wait for
the store, rows spool, and every row lands exactly once when it is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from sidecar.limits.borrowing import IDLE
from sidecar.limits.slots import LEASE
from tests.support.bodies import CHAT, CHAT_PATH
from tests.support.clients import post
from tests.support.fake_upstream import FakeUpstream, Script
from tests.support.faults import Fault, FaultProxy, through

STREAM = {**CHAT, "stream": True}
FAST_TIMEOUTS = {"upstream__first_byte_timeout": 0.6, "upstream__stream_idle_timeout": 0.6}


@pytest.fixture
async def upstream_proxy(fake: FakeUpstream) -> AsyncIterator[FaultProxy]:
    port = int(fake.url.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultProxy("127.0.0.1", port)
    await proxy.start()
    yield proxy
    await proxy.close()


POINTS = {"head": 8, "mid-stream": b"tok2", "usage event": b'"usage"'}
# (fault, point) -> (status the client sees, outcome in the row)
EXPECTED = {
    ("reset", "head"): (502, "upstream_error"),
    ("cut", "head"): (502, "upstream_error"),
    ("hold", "head"): (504, "upstream_timeout"),
    ("reset", "mid-stream"): (200, "upstream_error"),
    ("cut", "mid-stream"): (200, "upstream_error"),
    ("hold", "mid-stream"): (200, "upstream_timeout"),
    ("reset", "usage event"): (200, "upstream_error"),
    ("cut", "usage event"): (200, "upstream_error"),
    ("hold", "usage event"): (200, "upstream_timeout"),
}


@pytest.mark.parametrize(("kind", "point"), list(EXPECTED), ids=[f"{k}-{p}" for k, p in EXPECTED])
async def test_upstream_break_at_each_point(fake, upstream_proxy, sidecar_factory, kind, point):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1", **FAST_TIMEOUTS)
    upstream_proxy.fault = Fault(kind, at=POINTS[point])
    status, _, body = await post(running.url + CHAT_PATH, STREAM)
    want_status, want_outcome = EXPECTED[(kind, point)]
    assert upstream_proxy.faults_hit == 1
    assert status == want_status, body
    if status != 200:
        assert orjson.loads(body)["error"]["type"] in {"upstream_error", "upstream_timeout"}
    else:
        assert b"[DONE]" not in body, "a broken stream must not look finished"
        assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error\ndata: ")
    [row] = await running.stored(1)
    assert row["outcome"] == want_outcome
    if point == "mid-stream":
        assert (row["completion_tokens"], row["usage_source"]) == (2, "counted")  # tok0, tok1 went out
    if point == "usage event":
        assert (row["completion_tokens"], row["usage_source"]) == (5, "counted")
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        assert len(events) == 7  # role + 5 tokens + finish: all the content, none of the hidden usage


@pytest.mark.parametrize("kind", ["reset", "cut"])
async def test_upstream_break_inside_a_json_body(fake, upstream_proxy, sidecar_factory, kind):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1", **FAST_TIMEOUTS)
    upstream_proxy.fault = Fault(kind, at=b'"usage"')
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_dropped"
    [row] = await running.stored(1)
    assert row["outcome"] == "upstream_error"


async def test_latency_and_bandwidth_slow_the_stream_but_change_no_byte(fake, upstream_proxy, sidecar_factory):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1")
    upstream_proxy.latency = 0.3
    upstream_proxy.bandwidth = 4000
    async with aiohttp.ClientSession() as s:
        async with s.post(
            running.url + "/v1/chat/completions", json={**STREAM, "stream_options": {"include_usage": True}}
        ) as r:
            body = await r.read()
            rid = r.headers["x-request-id"]
    assert body == fake.sent[rid]
    [row] = await running.stored(1)
    assert row["outcome"] == "completed"
    assert row["ttft_ms"] >= 300


async def test_a_late_close_from_the_upstream_does_not_hold_the_client(fake, upstream_proxy, sidecar_factory):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1")
    upstream_proxy.close_delay = 5.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for doc in (STREAM, CHAT):
        assert (await post(running.url + CHAT_PATH, doc))[0] == 200
    assert loop.time() - start < 3.0  # both answered on framing, not on the connection's close
    assert [r["outcome"] for r in await running.stored(2)] == ["completed", "completed"]


async def test_upstream_down_then_back(fake, upstream_proxy, sidecar_factory):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1")
    assert (await post(running.url + CHAT_PATH, CHAT))[0] == 200
    await upstream_proxy.down()
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"
    async with aiohttp.ClientSession() as s, s.get(running.url + "/readyz") as r:
        assert r.status == 503
    await upstream_proxy.up()
    assert (await post(running.url + CHAT_PATH, STREAM))[0] == 200
    assert [r["outcome"] for r in await running.stored(3)] == ["completed", "upstream_error", "completed"]


# PostgreSQL behind the fault proxy


async def burst(url: str, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200


def spooled(running: Any) -> list[Path]:
    return list(Path(running.server.settings.server.data_dir, "spool").glob("requests.*.jsonl"))


@pytest.mark.parametrize("kind", ["down", "hold", "reset"])
async def test_postgres_fault_under_load_rows_spool_and_land_once(fake, pg_proxy, pg_url, sidecar_factory, kind):
    fake.script = Script(chunks=2)
    running = await sidecar_factory(
        fake.url, store__url=through(pg_proxy, pg_url), store__op_timeout=1.0, writer__flush_interval_ms=20
    )
    await burst(running.url, 10)
    await running.stored(10)
    if kind == "down":
        await pg_proxy.down()
    elif kind == "hold":
        pg_proxy.fault = Fault("hold", at=0, once=False)  # every connection goes silent
        await pg_proxy.down()  # ...and the pooled ones break, so the pool must open new (silent) ones
        await pg_proxy.up()
    else:
        pg_proxy.fault = Fault("reset", at=0, once=False)  # every connection is reset at its first byte from the server
        await pg_proxy.down()
        await pg_proxy.up()
    await burst(running.url, 40)  # served while the store is unusable
    await asyncio.sleep(1.5)
    assert spooled(running), "rows should be spooled while the store is unusable"
    pg_proxy.fault = None
    await pg_proxy.down()  # drop the silent or broken connections
    await pg_proxy.up()
    await burst(running.url, 10)
    rows = await running.stored(60, timeout=30)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == 60 == len(set(ids))
    assert {r["request_id"] for r in running.rows} == set(ids)


async def test_slow_postgres_does_not_slow_requests(fake, pg_proxy, pg_url, sidecar_factory):
    running = await sidecar_factory(fake.url, store__url=through(pg_proxy, pg_url))
    pg_proxy.latency = 0.5  # every answer from PostgreSQL takes half a second more
    loop = asyncio.get_running_loop()
    start = loop.time()
    await burst(running.url, 30)
    assert loop.time() - start < 0.5 * 10  # far less than one store round trip per request
    assert len(await running.stored(30, timeout=30)) == 30


@pytest.mark.parametrize(
    ("at", "retried"), [(b"HTTP/1.1 200", True), (b"content-type", False)], ids=["before-any-byte", "mid-head"]
)
async def test_reused_connection_reset_is_retried_only_before_any_response_byte(
    fake, upstream_proxy, sidecar_factory, at, retried
):
    running = await sidecar_factory(f"http://{upstream_proxy.url_host}/v1")
    assert (await post(running.url + CHAT_PATH, CHAT))[0] == 200  # the connection is now pooled
    upstream_proxy.fault = Fault("reset", at=at)  # hits the next response on that pooled connection
    status, _, _ = await post(running.url + CHAT_PATH, CHAT)
    assert upstream_proxy.faults_hit == 1
    assert status == (200 if retried else 502)
    assert len(fake.received) == (3 if retried else 2)


async def test_a_store_that_comes_back_with_another_peppers_fingerprint_makes_the_replica_unready(
    fake, pg_proxy, pg_url, sidecar_factory, tmp_path
):
    """At start a foreign fingerprint stops the process; a store that answers only later can no longer stop
    it, so the replica turns unready (every stored key would answer 401) and says why in the log."""
    first = await sidecar_factory(fake.url, store__url=pg_url, auth__pepper="the-first-pepper-0123456789")
    await first.server.drain()
    await pg_proxy.down()
    running = await sidecar_factory(
        fake.url,
        store__url=through(pg_proxy, pg_url),
        auth__pepper="another-pepper-0123456789abc",
        server__data_dir=str(tmp_path / "second"),
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(running.url + "/readyz") as r:
            assert (await r.json()).get("reason") != "pepper"  # not known yet: the store is away
        await pg_proxy.up()
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            async with s.get(running.url + "/readyz") as r:
                body = await r.json()
            if body.get("reason") == "pepper" or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
    assert r.status == 503 and body["reason"] == "pepper"
    assert "not the pepper the store's keys were hashed with" in running.log_text()


@pytest.mark.parametrize("policy", ["local", "reject"])
async def test_shared_limits_when_postgresql_goes_away(fake, pg_proxy, pg_url, sidecar_factory, policy):
    """limits.store_down: `local` keeps admitting by this replica's own limits (counted), `reject` answers 503;
    once the store is back the shared checks resume and nothing is left held."""
    running = await sidecar_factory(
        fake.url,
        store__url=through(pg_proxy, pg_url),
        store__op_timeout=1.0,
        auth__enabled=True,
        server__admin_token="faults-admin-token-0123",
        limits__store_down=policy,
    )
    admin = {"authorization": "Bearer faults-admin-token-0123"}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            running.url + "/admin/keys", json={"name": "k", "concurrency": 4, "rpm": 1000}, headers=admin
        ) as r:
            key = (await r.json())["key"]
        auth = {"authorization": f"Bearer {key}"}

        async def call() -> tuple[int, dict]:
            async with s.post(running.url + "/v1/chat/completions", json=CHAT, headers=auth) as r:
                return r.status, await r.json()

        assert (await call())[0] == 200  # the key is verified and cached; its shares borrowed
        await asyncio.sleep(IDLE * 1.5)  # ... and handed back when idle: the next request must ask the store
        await pg_proxy.down()
        statuses = [await call() for _ in range(3)]
        if policy == "local":
            assert [code for code, _ in statuses] == [200, 200, 200]
            text = await (await s.get(running.url + "/metrics")).text()
            assert "sidecar_limit_local_admissions_total" in text
        else:
            assert all(code == 503 and body["error"]["code"] == "store_unavailable" for code, body in statuses)
        await pg_proxy.up()
        deadline = asyncio.get_running_loop().time() + 15
        while (await call())[0] != 200:
            assert asyncio.get_running_loop().time() < deadline, "shared limits did not come back with the store"
            await asyncio.sleep(0.3)
    # Idle again: every slot this replica held goes back (idle for IDLE, seen by a sweep every LEASE / 3).
    deadline = asyncio.get_running_loop().time() + IDLE + LEASE / 3 + 3
    while True:
        with psycopg.connect(pg_url) as conn:
            held = conn.execute("SELECT COALESCE(SUM(slots), 0) FROM limit_slots").fetchone()[0]
        if held == 0 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert held == 0
