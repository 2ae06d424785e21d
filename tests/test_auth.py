"""Key state under pressure: revocation wins over a lookup in flight, a store outage is ridden out for at most
`auth.max_stale`, static keys reload when their file changes; and the demo upstream takes hang-ups calmly."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.config import AuthCfg, LimitsCfg
from sidecar.errors import Unauthorized
from sidecar.keys.auth import Authenticator
from sidecar.keys.format import format_key, hash_secret, new_key
from sidecar.keys.service import KeyAdmin
from sidecar.store import open_store
from tests.support.bodies import CHAT
from tests.support.clients import ADMIN, admin, chat
from tests.support.faults import through

PEPPER = b"p" * 32


async def test_a_revoke_during_a_slow_lookup_wins(pg_url, pg_proxy):
    """The lookup reads the key before the revoke commits, and its answer arrives after: it must not be cached."""
    direct = open_store(pg_url)
    await direct.open()
    await direct.migrate()
    slow = open_store(through(pg_proxy, pg_url))
    await slow.open()
    try:
        created = await KeyAdmin(direct, PEPPER).create({"name": "k"}, actor="test")
        auth = Authenticator(AuthCfg(cache_ttl=60, lookup_timeout=10), LimitsCfg(), slow, PEPPER)  # slow, not down
        headers = {"authorization": f"Bearer {created.key}"}
        pg_proxy.latency = 0.5  # every answer from PostgreSQL to this replica arrives half a second late
        lookup = asyncio.create_task(auth.authenticate(headers))
        await asyncio.sleep(0.2)  # the query has been answered by PostgreSQL; the answer is on its way
        await KeyAdmin(direct, PEPPER).revoke(created.row.id, actor="test")
        auth.forget(created.row.id)  # what the admin API does on the replica that revoked
        with pytest.raises(Unauthorized) as raised:
            await lookup
        assert raised.value.code == "key_revoked"
        assert auth.known(headers) is None
        with pytest.raises(Unauthorized):
            await auth.authenticate(headers)
    finally:
        pg_proxy.latency = 0
        await slow.close()
        await direct.close()


async def test_a_store_outage_is_ridden_out_for_max_stale_then_fails_closed(fake, sidecar_factory, pg_server, pg_url):
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        store__url=pg_url,
        store__op_timeout=0.3,
        auth__cache_ttl=0.2,
        auth__max_stale=1.5,
    )
    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "k"})
        key = created["key"]
        assert (await chat(s, running.url, key))[0] == 200
        pg_server.stop()
        try:
            confirmed = time.monotonic()
            statuses = []
            while time.monotonic() - confirmed < 3.0:
                status, _ = await chat(s, running.url, key)
                statuses.append((round(time.monotonic() - confirmed, 1), status))
                await asyncio.sleep(0.1)
        finally:
            pg_server.start()
    served = [t for t, status in statuses if status == 200]
    refused = [t for t, status in statuses if status == 503]
    assert served and max(served) <= 1.6, statuses  # the cached key works for max_stale...
    assert refused and min(refused) >= 1.4, statuses  # ...then the replica fails closed
    assert {status for _, status in statuses} <= {200, 503}
    assert "serving cached keys" in running.log_text()
    assert len(await running.stored(len(statuses) + 1, timeout=30)) == len(statuses) + 1  # spooled, then stored


async def test_static_keys_reload_when_the_file_changes_and_are_listed(fake, sidecar_factory, tmp_path):
    pepper = tmp_path / "pepper-file"
    pepper.write_text("static-pepper-0123456789\n")

    def line(name: str, revoked: bool = False) -> tuple[str, str, dict]:
        key, kid, secret = new_key()
        row = {"id": kid, "name": name, "hash": hash_secret(b"static-pepper-0123456789", secret), "created_at": 1.0}
        return key, kid, {**row, "revoked_at": time.time() if revoked else None}

    key_a, kid_a, row_a = line("a")
    key_b, kid_b, row_b = line("b")
    static = tmp_path / "secret" / "keys.jsonl"
    static.parent.mkdir()

    def publish(*rows: dict) -> None:  # as the kubelet does: write aside, then swap in atomically
        tmp = static.parent / ".new"
        tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        os.replace(tmp, static)

    publish(row_a, row_b)
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        auth__pepper_file=str(pepper),
        auth__static_keys_file=str(static),
        auth__cache_ttl=0.2,
    )
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, running.url, key_a))[0] == 200
        assert (await chat(s, running.url, key_b))[0] == 200
        _, listed, _ = await admin(s, "GET", running.url + "/admin/keys")
        assert {(k["id"], k["source"]) for k in listed["data"]} == {(kid_a, "static"), (kid_b, "static")}
        assert all("hash" not in k for k in listed["data"])
        status, body, _ = await admin(s, "DELETE", f"{running.url}/admin/keys/{kid_a}")
        assert status == 400 and body["error"]["code"] == "static_key"
        publish({**row_a, "revoked_at": time.time()})  # a revoked, b removed
        await asyncio.sleep(1.5)  # the file is checked once a second; the cache lives 0.2 s
        status, body = await chat(s, running.url, key_a)
        assert status == 401 and body["error"]["code"] == "key_revoked"
        status, body = await chat(s, running.url, key_b)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        static.write_text("5\n")  # a broken update keeps what was loaded
        await asyncio.sleep(1.3)
        assert (await chat(s, running.url, key_a))[0] == 401
    log = running.log_text()
    assert "static_keys_file reloaded" in log and "cannot be read" in log


async def test_the_demo_upstream_takes_a_hang_up_mid_stream_calmly(log_catcher):
    from aiohttp.test_utils import TestServer

    from sidecar.demo_upstream import create_demo_app

    server = TestServer(create_demo_app(), host="127.0.0.1")
    await server.start_server()
    try:
        body = orjson.dumps({"model": "demo", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True})
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        await reader.readuntil(b"data: ")
        writer.transport.abort()
        await asyncio.sleep(0.5)  # the demo tries to send the next words
    finally:
        await server.close()
    text = "\n".join(log_catcher.lines)
    assert "Traceback" not in text and "Error handling request" not in text, text


async def test_a_static_key_removed_while_the_store_is_down_stops_working(
    fake, sidecar_factory, tmp_path, pg_server, pg_url
):
    key, kid, secret = new_key()
    static = tmp_path / "keys.jsonl"
    static.write_bytes(orjson.dumps({"id": kid, "name": "s", "hash": hash_secret(PEPPER, secret), "created_at": 1.0}))
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        auth__pepper=PEPPER.decode(),
        auth__static_keys_file=str(static),
        auth__cache_ttl=0.2,
        store__url=pg_url,
        store__op_timeout=0.3,
    )
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, running.url, key))[0] == 200
        pg_server.stop()
        try:
            tmp = tmp_path / ".new"
            tmp.write_text("")
            os.replace(tmp, static)
            await asyncio.sleep(1.3)
            status, body = await chat(s, running.url, key)
        finally:
            pg_server.start()
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert len(await running.stored(2, timeout=30)) == 2  # the spooled rows land once PostgreSQL is back


async def _load(session, url, key, seconds, workers=4):
    """`workers` clients sending chats back to back for `seconds`: (status, latency) of each."""
    results = []
    end = time.monotonic() + seconds

    async def client():
        while time.monotonic() < end:
            t0 = time.monotonic()
            status, _ = await chat(session, url, key)
            results.append((status, time.monotonic() - t0))

    await asyncio.gather(*(client() for _ in range(workers)))
    return results


def _p99(results):
    latencies = sorted(latency for _, latency in results)
    return latencies[int(len(latencies) * 0.99)]


async def test_a_store_outage_under_load_costs_no_latency_and_keeps_the_replica_ready(
    fake, sidecar_factory, pg_server, pg_url, tmp_path
):
    """PostgreSQL stopped (the store's own timeouts at their defaults: 5 s to get a connection) under load from a
    store key and a static key: keys in use are refreshed in the background, so no request waits on the store
    (a static key's lookups must not make the replica think the store is back); /readyz stays 200 and says the
    store is down, fast; every row spools and lands once the store is back."""
    pepper = b"static-pepper-0123456789"
    static_key, kid, secret = new_key()
    static = tmp_path / "keys.jsonl"
    static.write_bytes(orjson.dumps({"id": kid, "name": "s", "hash": hash_secret(pepper, secret), "created_at": 1.0}))
    (tmp_path / "pepper").write_bytes(pepper)
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        auth__pepper_file=str(tmp_path / "pepper"),
        auth__static_keys_file=str(static),
        server__admin_token=ADMIN,
        store__url=pg_url,
        auth__cache_ttl=0.5,
    )
    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "busy"})
        key = created["key"]
        before = await _load(s, running.url, key, 1.5)
        pg_server.stop()
        try:
            during, static_during = await asyncio.gather(  # 14 cache TTLs, past the pool's 5 s wait
                _load(s, running.url, key, 7.0, workers=3), _load(s, running.url, static_key, 7.0, workers=1)
            )
            t0 = time.monotonic()
            async with s.get(running.url + "/readyz") as r:
                ready, doc, probe = r.status, await r.json(), time.monotonic() - t0
        finally:
            pg_server.start()
    assert {status for status, _ in before + during + static_during} == {200}
    assert _p99(during) <= _p99(before) + 0.05, (_p99(before), _p99(during))
    assert max(latency for _, latency in during) < 0.3  # not one request waited on the store (5 s before)
    assert ready == 200 and doc["store"] == "down"
    assert probe < 1.0 and "127.0.0.1" not in orjson.dumps(doc).decode()
    log = running.log_text()
    assert "key store unavailable" in log and "store unreachable" in log and "key store answering again" not in log
    total = len(before) + len(during) + len(static_during)
    assert len(await running.stored(total, timeout=30)) == total


async def test_an_idle_key_waits_for_a_dead_store_at_most_lookup_timeout_once(fake, sidecar_factory, pg_server, pg_url):
    """A key whose entry expired while it was idle: the first request waits at most auth.lookup_timeout, then
    is served the key's last known state; the next ones do not wait at all. An unknown key is a 503 within it."""
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        store__url=pg_url,
        auth__cache_ttl=0.2,
        auth__lookup_timeout=0.3,
    )
    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "idle"})
        assert (await chat(s, running.url, created["key"]))[0] == 200
        pg_server.stop()
        try:
            await asyncio.sleep(0.5)  # the entry expires, idle
            timed = []
            for key in (created["key"], created["key"], created["key"], new_key()[0]):
                t0 = time.monotonic()
                status, body = await chat(s, running.url, key)
                timed.append((status, time.monotonic() - t0, body.get("error", {}).get("code")))
        finally:
            pg_server.start()
    (first, t_first, _), (second, t_second, _), (third, t_third, _), (unknown, t_unknown, code) = timed
    assert (first, second, third) == (200, 200, 200), timed
    assert t_first <= 0.6 and t_second < 0.1 and t_third < 0.1, timed
    assert unknown == 503 and code == "store_unavailable" and t_unknown <= 0.6, timed


async def test_a_replica_started_with_the_store_down_serves_static_keys_and_lands_every_row(
    fake, sidecar_factory, pg_server, pg_url, tmp_path
):
    """PostgreSQL down when the sidecar starts (the database never migrated): it starts, is ready, verifies
    static keys, spools rows; when PostgreSQL comes back it migrates and every row lands, once."""
    pepper = b"static-pepper-0123456789"
    key, kid, secret = new_key()
    static = tmp_path / "keys.jsonl"
    static.write_bytes(orjson.dumps({"id": kid, "name": "s", "hash": hash_secret(pepper, secret), "created_at": 1.0}))
    (tmp_path / "pepper").write_bytes(pepper)
    pg_server.stop()
    try:
        running = await sidecar_factory(
            fake.url,
            auth__enabled=True,
            auth__pepper_file=str(tmp_path / "pepper"),
            auth__static_keys_file=str(static),
            store__url=pg_url,
        )
        async with aiohttp.ClientSession() as s:
            statuses = [(await chat(s, running.url, key))[0] for _ in range(20)]
            unknown, body = await chat(s, running.url, new_key()[0])
            async with s.get(running.url + "/readyz") as r:
                ready, doc = r.status, await r.json()
    finally:
        pg_server.start()
    assert statuses == [200] * 20
    assert unknown == 503 and body["error"]["code"] == "store_unavailable"
    assert ready == 200 and doc["store"] == "down"
    rows = await running.stored(21, timeout=30)  # 20 served, 1 refused: all spooled, then stored once
    assert len(rows) == 21 == len({r["request_id"] for r in rows})
    assert "store unreachable at start" in running.log_text() and "store reachable" in running.log_text()


async def test_unknown_keys_from_one_client_address_are_refused_without_a_lookup_past_its_allowance(
    fake, sidecar_factory
):
    """Behind a trusted proxy, the client's address is the one it forwards: from one address, 60 forged keys a
    minute get their lookup and a 401; the next gets a 429 with Retry-After, without a lookup. Another address
    has its own allowance, and a key already verified is not slowed down. A real key new to this replica, from
    the address that used up its allowance, is told to retry (429), never that it is wrong (401)."""
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, server__trusted_proxies=["127.0.0.1"]
    )

    async def ask(s: aiohttp.ClientSession, key: str, client: str) -> tuple[int, Any, Any]:
        headers = {"authorization": f"Bearer {key}", "x-forwarded-for": client}
        async with s.post(running.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            return r.status, r.headers, await r.json()

    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "known"})
        assert (await ask(s, created["key"], "203.0.113.7"))[0] == 200
        forged = [format_key(f"{i:012d}", "A" * 32) for i in range(62)]
        answers = [await ask(s, key, "203.0.113.7") for key in forged[:61]]
        assert [status for status, _, _ in answers] == [401] * 60 + [429]
        _, headers, body = answers[-1]
        assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
        assert "unknown API keys" in body["error"]["message"]
        assert (await ask(s, forged[61], "203.0.113.8"))[0] == 401  # another client: its own allowance
        assert (await ask(s, created["key"], "203.0.113.7"))[0] == 200  # a verified key: no lookup, no wait
        _, fresh, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "new"})
        assert (await ask(s, fresh["key"], "203.0.113.7"))[0] == 429
        assert (await ask(s, fresh["key"], "203.0.113.9"))[0] == 200
        async with s.get(running.url + "/metrics") as r:
            assert 'sidecar_rate_limited_total{reason="unknown_key"} 2.0' in await r.text()
