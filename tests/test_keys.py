"""Keys end to end: format, auth errors, admin API and CLI with their audit rows, rollback, no key leaks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.keys.format import KEY_LEN, format_key, new_key, parse_key
from tests.support.bodies import CHAT
from tests.support.clients import ADMIN, admin, chat


def test_key_format_round_trip():
    key, kid, secret = new_key()
    assert key.startswith("sk-sc-") and len(key) == KEY_LEN and parse_key(key) == (kid, secret)


@given(st.integers(0, KEY_LEN - 1), st.sampled_from("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ-_"))
def test_a_single_typo_is_caught_by_the_checksum(position, char):
    key, _, _ = new_key()
    typo = key[:position] + char + key[position + 1 :]
    if typo != key:
        assert parse_key(typo) is None


@pytest.fixture
async def keyed(fake, sidecar_factory, store_url):
    return await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=store_url)


async def test_auth_errors(keyed):
    async with aiohttp.ClientSession() as s:
        status, body = await chat(s, keyed.url, None)
        assert status == 401 and body["error"]["code"] is None and "API key" in body["error"]["message"]
        status, body = await chat(s, keyed.url, "sk-nonsense")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        fake_key, _, _ = new_key()  # well-formed, unknown
        status, body = await chat(s, keyed.url, fake_key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        _, created, _ = await admin(s, "POST", keyed.url + "/admin/keys", {"name": "k", "expires_in": "1s"})
        assert (await chat(s, keyed.url, created["key"]))[0] == 200
        time.sleep(1.1)
        keyed.server.app[__import__("sidecar.app").app.AUTH].forget(created["id"])
        status, body = await chat(s, keyed.url, created["key"])
        assert status == 401 and body["error"]["code"] == "key_expired"
    assert {r["outcome"] for r in keyed.rows[:3]} == {"unauthorized"}


async def test_admin_api_end_to_end_with_audit_rows(keyed, fake):
    async with aiohttp.ClientSession() as s:
        assert (await admin(s, "GET", keyed.url + "/admin/keys", token="wrong"))[0] == 401
        status, created, rid = await admin(
            s, "POST", keyed.url + "/admin/keys", {"name": "alice", "models": ["m"], "rpm": 100}
        )
        assert status == 201 and created["key"].startswith("sk-sc-") and "hash" not in created
        key, kid = created["key"], created["id"]
        assert (await chat(s, keyed.url, key))[0] == 200
        status, body = await chat(s, keyed.url, key, {**CHAT, "model": "other"})
        assert status == 403 and body["error"]["type"] == "permission_error"
        assert len(fake.received) == 1  # the forbidden request never reached the upstream
        status, shown, _ = await admin(s, "GET", f"{keyed.url}/admin/keys/{kid}")
        assert status == 200 and shown["name"] == "alice" and shown["models"] == ["m"]
        status, updated, rid2 = await admin(s, "PATCH", f"{keyed.url}/admin/keys/{kid}", {"models": None, "rpm": 5})
        assert status == 200 and updated["rpm"] == 5
        assert (await chat(s, keyed.url, key, {**CHAT, "model": "other"}))[0] == 200
        status, _, rid3 = await admin(s, "DELETE", f"{keyed.url}/admin/keys/{kid}")
        assert status == 200
        status, body = await chat(s, keyed.url, key)  # revoked on this replica: at once
        assert status == 401 and body["error"]["code"] == "key_revoked"
        assert (await admin(s, "PATCH", f"{keyed.url}/admin/keys/{kid}", {"bogus": 1}))[0] == 400
        assert (await admin(s, "GET", f"{keyed.url}/admin/keys/nosuchkey000"))[0] == 404
        status, log, _ = await admin(s, "GET", keyed.url + "/admin/audit")
    actions = [(e["action"], e["target"], e["request_id"]) for e in reversed(log["data"])]
    assert actions == [("key.create", kid, rid), ("key.update", kid, rid2), ("key.revoke", kid, rid3)]
    assert log["data"][1]["changes"] == {"models": None, "rpm": 5}
    assert all(e["actor"].startswith("admin-api:") for e in log["data"])
    text = keyed.log_text() + orjson.dumps(keyed.rows).decode() + orjson.dumps(log).decode()
    async with aiohttp.ClientSession() as s, s.get(keyed.url + "/metrics") as r:
        text += await r.text()
    assert key not in text and key.split("-")[3] not in text and ADMIN not in text


async def test_huge_numbers_in_queries_are_400s_not_500s(keyed):
    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", keyed.url + "/admin/keys", {"name": "q"})
        auth = {"authorization": f"Bearer {created['key']}"}
        for query in ("9" * 400 + "d", "1e999", "nan", "inf", "-9" * 30 + "s"):
            async with s.get(keyed.url + "/v1/usage", params={"since": query}, headers=auth) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "since", query
        for path in (
            "/admin/audit?before=" + "9" * 400,
            "/admin/audit?limit=" + "9" * 40,
            "/admin/requests?before=1e999:x",
            "/admin/requests?since=nan",
            "/admin/usage?since=999999999999d",
        ):
            status, body, _ = await admin(s, "GET", keyed.url + path)
            assert status == 400 and body["error"]["type"] == "invalid_request_error", path


async def test_admin_api_is_off_without_a_token(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True)
    async with aiohttp.ClientSession() as s:
        assert (await admin(s, "GET", running.url + "/admin/keys"))[0] == 404


async def test_failed_audit_write_rolls_the_change_back(fake, sidecar_factory, tmp_path):
    db = tmp_path / "rb.db"
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, store__url=f"sqlite:///{db}"
    )
    with sqlite3.connect(db) as conn:  # a real failure in the real database: the audit insert aborts
        conn.execute(
            "CREATE TRIGGER no_audit BEFORE INSERT ON admin_audit_log BEGIN SELECT RAISE(ABORT, 'audit down'); END"
        )
    async with aiohttp.ClientSession() as s:
        status, body, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "x"})
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        status, listing, _ = await admin(s, "GET", running.url + "/admin/keys")
    assert listing["data"] == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 0


def run_cli(tmp_path, *args):
    env = {**os.environ, "SIDECAR_SERVER_DATA_DIR": str(tmp_path), "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/c.db"}
    return subprocess.run([sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_cli_keys_end_to_end(tmp_path, fake, sidecar_factory):
    # The server first: it creates the pepper (in its data_dir) and the store; the CLI uses both.
    running = await sidecar_factory(
        fake.url, auth__enabled=True, store__url=f"sqlite:///{tmp_path}/c.db", server__data_dir=str(tmp_path)
    )
    out = run_cli(tmp_path, "keys", "create", "--name", "bob", "--tpm", "5000", "--models", "m,n")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    kid = parse_key(key)[0]
    listing = orjson.loads(run_cli(tmp_path, "keys", "list", "--format", "json").stdout)
    assert [(k["id"], k["tpm"], k["models"]) for k in listing] == [(kid, 5000, ["m", "n"])]
    assert orjson.loads(run_cli(tmp_path, "keys", "update", kid, "--rpm", "7").stdout)["rpm"] == 7
    assert orjson.loads(run_cli(tmp_path, "keys", "show", kid).stdout)["rpm"] == 7
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, running.url, key))[0] == 200  # same pepper file, same store: the key works
    assert run_cli(tmp_path, "keys", "revoke", kid).returncode == 0
    events = orjson.loads(run_cli(tmp_path, "audit-log").stdout)
    assert [e["action"] for e in reversed(events)] == ["key.create", "key.update", "key.revoke"]
    assert all(e["actor"].startswith("cli:") for e in events)
    assert run_cli(tmp_path, "keys", "show", "nosuchkey000").returncode == 1
    bad = run_cli(tmp_path, "keys", "create", "--name", "x", "--expires-in", "soon")
    assert bad.returncode == 1 and "Invalid duration" in bad.stderr
    assert key not in run_cli(tmp_path, "audit-log").stdout


async def test_static_keys_file(tmp_path, fake, sidecar_factory):
    pepper = tmp_path / "pepper"
    pepper.write_text("static-pepper-0123456789\n")
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", "create", "--name", "svc", "--static"],
        # No store where this line is made (an operator's laptop): nothing to check the pepper against.
        env={
            **os.environ,
            "SIDECAR_AUTH_PEPPER_FILE": str(pepper),
            "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/none.db",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    static = tmp_path / "keys.jsonl"
    static.write_text(out.stdout)
    key = out.stderr.split("shown once): ")[1].strip()
    running = await sidecar_factory(
        fake.url, auth__enabled=True, auth__pepper_file=str(pepper), auth__static_keys_file=str(static)
    )
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, running.url, key))[0] == 200
        assert running.rows[-1]["key_id"] == parse_key(key)[0]
    assert parse_key(key)[1].encode() not in static.read_bytes()  # the file holds the hash, never the secret


async def test_a_busy_key_whose_cache_expired_is_looked_up_once(tmp_path):
    """Many requests arriving when a key's cache entry has expired share one store lookup."""
    from sidecar.config import AuthCfg, LimitsCfg
    from sidecar.keys.auth import Authenticator
    from sidecar.keys.service import KeyAdmin
    from sidecar.store.sqlite import SqliteStore

    class CountingStore(SqliteStore):  # the real SQLite store; it counts key lookups and makes them slow
        lookups = 0

        async def get_key(self, key_id):
            CountingStore.lookups += 1
            await asyncio.sleep(0.05)
            return await super().get_key(key_id)

    store = CountingStore(str(tmp_path / "k.db"))
    await store.open()
    await store.migrate()
    try:
        pepper = b"p" * 32
        created = await KeyAdmin(store, pepper).create({"name": "busy"}, actor="test")
        auth = Authenticator(AuthCfg(cache_ttl=0.2), LimitsCfg(), store, pepper)
        headers = {"authorization": f"Bearer {created.key}"}
        for _ in range(2):  # a cold cache, then an expired one
            principals = await asyncio.gather(*(auth.authenticate(headers) for _ in range(50)))
            assert {p.key_id for p in principals} == {created.row.id}
            await asyncio.sleep(0.25)
        assert CountingStore.lookups == 2
    finally:
        await store.close()


async def test_a_right_id_with_a_wrong_secret_is_refused_through_compare_digest(keyed, monkeypatch):
    """The stored hash is compared in constant time: through hmac.compare_digest (recorded here), and a key
    whose id exists but whose secret is wrong (with a valid checksum) is a 401."""
    import hmac

    compared = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    async with aiohttp.ClientSession() as s:
        _, created, _ = await admin(s, "POST", keyed.url + "/admin/keys", {"name": "w"})
        kid, secret = parse_key(created["key"])
        forged = format_key(kid, secret[::-1] if secret[::-1] != secret else "A" * len(secret))
        monkeypatch.setattr(hmac, "compare_digest", recording)
        status, doc = await chat(s, keyed.url, forged)
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"
        assert len(compared) == 1 and len(compared[0][0]) == 64  # the stored sha256 hex against the candidate's
        assert (await chat(s, keyed.url, created["key"]))[0] == 200
        assert len(compared) == 2 and compared[1][0] == compared[1][1]


async def test_no_secret_at_rest_in_the_database_files(keyed, store_url, request):
    """Every byte of the store's files (SQLite with its WAL; PostgreSQL's whole data directory after a
    checkpoint) holds keys' hashes and ids, never their secrets or the full keys."""
    import pathlib

    async with aiohttp.ClientSession() as s:
        made = [(await admin(s, "POST", keyed.url + "/admin/keys", {"name": f"r{i}"}))[1] for i in range(3)]
        for created in made:
            assert (await chat(s, keyed.url, created["key"]))[0] == 200
    await keyed.stored(expect=3)
    if store_url.startswith("sqlite"):
        base = pathlib.Path(store_url.removeprefix("sqlite:///"))
        files = [p for p in base.parent.glob(base.name + "*") if p.is_file()]
    else:
        import psycopg

        async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as conn:
            await conn.execute("CHECKPOINT")
        files = [p for p in pathlib.Path(request.getfixturevalue("pg_server").data).rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    for created in made:
        kid, secret = parse_key(created["key"])
        assert kid.encode() in blob  # the scan reads the files the keys are in
        assert secret.encode() not in blob and created["key"].encode() not in blob
