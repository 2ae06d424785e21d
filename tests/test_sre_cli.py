"""The CLI and logs as an operator meets them (#16): the pepper only `serve` makes and the store recognises,
the data directory that holds the default store, commands that refuse a missing store, tables people read,
the `requests` command, usage by name and date, the admin API's parameters, audit export from the jsonl sink,
access lines, the printed curl lines."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest

from sidecar.keys.format import parse_key
from tests.support.processes import cli, reap
from tests.support.waits import free_port, wait_listening

ADMIN = "sre-admin-token-0123"
AUTH = {"authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def keyed(fake, sidecar_factory, tmp_path, **options):
    """A server whose data_dir is tmp_path and whose store is the default one there (no store.url given)."""
    return await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        store__url="",
        server__data_dir=str(tmp_path),
        **options,
    )


async def chat(url, key, model="m", agent=None):
    headers = {"authorization": f"Bearer {key}"}
    if agent:
        headers["user-agent"] = agent
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/chat/completions", json={**CHAT, "model": model}, headers=headers) as r,
    ):
        return r.status, await r.json()


# --- the pepper and the store ---------------------------------------------------------------------------------


async def test_data_dir_holds_the_default_store_and_the_pepper(fake, sidecar_factory, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "elsewhere"
    running = await keyed(fake, sidecar_factory, data)
    assert running.server.settings.store.url == f"sqlite:///{data / 'sidecar.db'}"
    assert (data / "sidecar.db").exists() and (data / "pepper").exists()
    assert not (tmp_path / "data").exists()  # nothing in ./data any more


async def test_only_serve_makes_a_pepper_and_the_store_refuses_another(fake, sidecar_factory, tmp_path):
    await keyed(fake, sidecar_factory, tmp_path)
    db = f"sqlite:///{tmp_path / 'sidecar.db'}"
    other = tmp_path / "other-dir"
    out = cli(other, "keys", "create", "--name", "x", db=db)  # the server's store, from another directory
    assert out.returncode == 2 and "only `sidecar serve` generates one" in out.stderr and "sk-" not in out.stdout
    assert not other.exists()  # no pepper of its own was written
    out = cli(other, "keys", "create", "--name", "x", db=db, SIDECAR_AUTH_PEPPER="a-different-pepper-0123456789")
    assert out.returncode == 2 and "not the pepper the store's keys were hashed with" in out.stderr
    assert out.stdout == "" and len(out.stderr.strip().splitlines()) == 1
    good = cli(tmp_path, "keys", "create", "--name", "ok")  # the server's data_dir: its pepper
    assert good.returncode == 0, good.stderr
    pepper = (tmp_path / "pepper").read_text().strip()
    raw = (tmp_path / "sidecar.db").read_bytes() + (tmp_path / "sidecar.db-wal").read_bytes()
    assert pepper.encode() not in raw  # the store keeps a fingerprint, never the pepper
    with sqlite3.connect(tmp_path / "sidecar.db") as conn:
        (value,) = conn.execute("SELECT value FROM settings WHERE name = 'pepper_fingerprint'").fetchone()
    assert value.startswith("pbkdf2-sha256$600000$")


def serve_once(data_dir, *extra_env, upstream):
    port = free_port()
    env = {**os.environ, "SIDECAR_SERVER_DATA_DIR": str(data_dir), "SIDECAR_UPSTREAM_URL": upstream}
    env.pop("SIDECAR_STORE_URL", None)
    env.update(dict(extra_env))
    return port, subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )


async def test_serve_refuses_a_pepper_the_store_does_not_know_unless_rotating(fake, tmp_path):
    port, proc = serve_once(tmp_path, upstream=fake.url)
    try:
        await wait_listening(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc)
    new = ("SIDECAR_AUTH_PEPPER", "rotated-pepper-0123456789abcdef")
    port, proc = serve_once(tmp_path, new, upstream=fake.url)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "not the pepper the store's keys were hashed with" in err
    assert "Traceback" not in err
    port, proc = serve_once(tmp_path, new, ("SIDECAR_AUTH_PEPPER_ROTATE", "true"), upstream=fake.url)
    try:
        await wait_listening(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "auth.pepper_rotate: the store now takes the new pepper" in err
    out = cli(tmp_path, "keys", "create", "--name", "after", SIDECAR_AUTH_PEPPER=new[1])
    assert out.returncode == 0, out.stderr  # the store knows the new pepper now


@pytest.mark.parametrize(
    "args",
    [
        ("usage",),
        ("keys", "list"),
        ("keys", "show", "x"),
        ("requests",),
        ("audit-log",),
        ("audit", "export"),
    ],
)
def test_commands_refuse_a_missing_store_in_one_line(tmp_path, args):
    out = cli(tmp_path / "nothing-here", *args)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("sidecar: no sidecar store at sqlite:///")
    assert not (tmp_path / "nothing-here").exists()  # no empty database was made


def test_keys_create_never_makes_a_store_no_server_reads(tmp_path):
    """With the server's pepper but a store that does not exist (another directory, a mistyped --db): one line,
    no key printed, no database made."""
    out = cli(tmp_path / "d", "keys", "create", "--name", "x", SIDECAR_AUTH_PEPPER="the-servers-pepper-0123456789")
    assert out.returncode == 1 and out.stdout == "" and "no sidecar store at" in out.stderr
    assert not (tmp_path / "d").exists()


async def test_commands_refuse_a_database_that_is_not_a_sidecar_store(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    out = cli(tmp_path, "usage", db=f"sqlite:///{path}")
    assert out.returncode == 1 and "no sidecar store at" in out.stderr
    assert cli(tmp_path, "migrate", db=f"sqlite:///{path}").returncode == 0  # migrate may make one


# --- keys and reports -------------------------------------------------------------------------------------------


async def test_keys_list_show_update_by_name_formats_and_models(fake, sidecar_factory, tmp_path):
    await keyed(fake, sidecar_factory, tmp_path)
    made = cli(tmp_path, "keys", "create", "--name", "team-a", "--models", "m,n", "--expires-in", "30d", "--rpm", "5")
    assert made.returncode == 0, made.stderr
    table = cli(tmp_path, "keys", "list")
    assert table.returncode == 0
    header, row = table.stdout.splitlines()
    assert header.split() == ["id", "name", "status", "rpm", "tpm", "concurrency", "weight", "priority", "models",
                              "expires_at", "created_at", "source"]  # fmt: skip
    assert "team-a" in row and "active" in row and "m,n" in row and "None" not in table.stdout
    assert row.split()[6:8] == ["1", "normal"]  # weight and priority: the defaults, as a person reads them
    made = cli(tmp_path, "keys", "create", "--name", "batch", "--weight", "2.5", "--priority", "low")
    assert made.returncode == 0, made.stderr
    assert cli(tmp_path, "keys", "list").stdout.splitlines()[-1].split()[6:8] == ["2.5", "low"]
    cli(tmp_path, "keys", "revoke", "batch")
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row)
    rows = list(csv.DictReader(io.StringIO(cli(tmp_path, "keys", "list", "--format", "csv").stdout)))
    assert rows[0]["name"] == "team-a" and rows[0]["rpm"] == "5"
    shown = orjson.loads(cli(tmp_path, "keys", "show", "team-a").stdout)  # by name
    assert shown["name"] == "team-a" and shown["created_time"].endswith("Z")
    changed = orjson.loads(cli(tmp_path, "keys", "update", "team-a", "--models", "*", "--expires-in", "never").stdout)
    assert changed["models"] is None and changed["expires_at"] is None
    cli(tmp_path, "keys", "create", "--name", "team-a")
    twice = cli(tmp_path, "keys", "show", "team-a")
    assert twice.returncode == 1 and "2 keys are named 'team-a'" in twice.stderr
    evil = cli(tmp_path, "keys", "create", "--name", "@evil", "--models", '=HYPERLINK("http://e.example/"),m2')
    assert evil.returncode == 0, evil.stderr
    rows = list(csv.DictReader(io.StringIO(cli(tmp_path, "keys", "list", "--format", "csv").stdout)))
    (bad,) = [r for r in rows if r["name"] == "'@evil"]  # a spreadsheet shows these cells, never runs them
    assert bad["models"].startswith("'=HYPERLINK")
    revoked = cli(tmp_path, "keys", "revoke", shown["id"])
    assert revoked.returncode == 0 and "revoked" in cli(tmp_path, "keys", "list").stdout


async def test_usage_and_requests_by_name_date_model_and_format(fake, sidecar_factory, tmp_path):
    running = await keyed(fake, sidecar_factory, tmp_path)
    key = cli(tmp_path, "keys", "create", "--name", "billing").stdout.strip()
    for model in ("m", "m", "other"):
        assert (await chat(running.url, key, model))[0] == 200
    await running.stored(3)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    usage = cli(tmp_path, "usage", "--since", today)
    assert usage.returncode == 0, usage.stderr
    assert "billing" in usage.stdout and "None" not in usage.stdout and "usage from" in usage.stderr
    by_model = orjson.loads(cli(tmp_path, "usage", "--by", "model", "--key", "billing", "--format", "json").stdout)
    assert {r["model"]: r["requests"] for r in by_model} == {"m": 2, "other": 1}
    old = ("--since", "2000-01-01", "--until", "2000-01-02T00:00Z")
    assert cli(tmp_path, "usage", *old, "--format", "json").stdout.strip() == "[]"
    bad = cli(tmp_path, "usage", "--since", "yesterday-ish")
    assert bad.returncode == 1 and "`since` must be" in bad.stderr
    listed = cli(tmp_path, "requests", "--model", "other")
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and len(lines) == 2 and "billing" in lines[1] and "completed" in lines[1]
    rows = orjson.loads(cli(tmp_path, "requests", "--key", "billing", "--format", "json", "--limit", "2").stdout)
    assert len(rows) == 2 and {r["key_id"] for r in rows} == {parse_key(key)[0]}
    assert "request_id" in cli(tmp_path, "requests", "--format", "csv").stdout.splitlines()[0]


async def test_admin_api_parameters_are_honoured_or_refused(fake, sidecar_factory, tmp_path):
    running = await keyed(fake, sidecar_factory, tmp_path)
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(running.url + "/admin/keys", json={"name": "k"}) as r:
            key = (await r.json())["key"]
        for model in ("m", "other"):
            assert (await chat(running.url, key, model))[0] == 200
        await running.stored(2)
        async with s.get(running.url + "/admin/usage", params={"by": "model", "format": "csv"}) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            assert [row["model"] for row in csv.DictReader(io.StringIO(await r.text()))] == ["m", "other"]
        async with s.get(running.url + "/admin/usage", params={"by": "model", "model": "other"}) as r:
            assert [row["model"] for row in (await r.json())["data"]] == ["other"]
        async with s.get(running.url + "/admin/requests", params={"model": "m", "since": "1h"}) as r:
            assert [row["model"] for row in (await r.json())["data"]] == ["m"]
        own = {"authorization": f"Bearer {key}"}
        async with s.get(running.url + "/v1/usage", params={"until": "2000-01-01"}, headers=own) as r:
            assert r.status == 200 and (await r.json())["data"] == []
        async with s.get(running.url + "/v1/usage", params={"since": "1h"}, headers=own) as r:
            assert [row["requests"] for row in (await r.json())["data"]] == [1, 1]
        async with s.get(running.url + "/v1/usage", params={"key_id": "someone-else"}, headers=own) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "key_id"
        for path, params, param in (
            ("/admin/usage", {"since": "soon"}, "since"),
            ("/admin/usage", {"until": "x"}, "until"),
            ("/admin/usage", {"format": "xml"}, "format"),
            ("/admin/usage", {"modle": "m"}, "modle"),
            ("/admin/requests", {"outcom": "completed"}, "outcom"),
            ("/admin/keys", {"status": "revoked"}, "status"),
        ):
            async with s.get(running.url + path, params=params) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == param, (path, params, body)


async def test_audit_export_reads_the_jsonl_sink_and_says_what_it_read(fake, sidecar_factory, tmp_path):
    running = await keyed(fake, sidecar_factory, tmp_path, audit__capture="all")
    key = cli(tmp_path, "keys", "create", "--name", "audited").stdout.strip()
    assert (await chat(running.url, key))[0] == 200
    await running.stored(1)
    await running.server.drain()  # the jsonl sink closes its segment
    out = cli(tmp_path, "audit", "export")
    records = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and len(records) == 1 and records[0]["key_id"]
    assert "1 from the jsonl sink" in out.stderr
    assert cli(tmp_path, "audit", "export", "--key", "audited").stdout == out.stdout  # by name
    none = cli(tmp_path, "audit", "export", "--since", "2000-01-01", "--until", "2000-01-02")
    assert none.stdout == "" and "0 from the jsonl sink" in none.stderr and "audit.capture" in none.stderr
    stderr_only = cli(tmp_path, "audit", "export", SIDECAR_AUDIT_SINKS="stderr")
    assert stderr_only.returncode == 1 and "none can be read back" in stderr_only.stderr


# --- logs and the printed lines --------------------------------------------------------------------------------


async def test_access_lines_have_the_log_fields_client_and_revoked_key_id(fake, sidecar_factory, tmp_path):
    running = await keyed(fake, sidecar_factory, tmp_path)
    key = cli(tmp_path, "keys", "create", "--name", "gone").stdout.strip()
    assert (await chat(running.url, key, agent="my-agent/1.0 sk-abcdefghijklmnop"))[0] == 200
    kid = orjson.loads(cli(tmp_path, "keys", "show", "gone").stdout)["id"]
    assert cli(tmp_path, "keys", "revoke", kid).returncode == 0
    deadline = time.monotonic() + 10
    while (status := (await chat(running.url, key))[0]) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # the revocation reaches this replica within auth.cache_ttl
    assert status == 401
    first, last = running.rows[0], running.rows[-1]
    assert isinstance(first["ts"], float) and first["level"] == "info" and first["msg"] == "request"
    assert first["client_addr"] == "127.0.0.1" and first["user_agent"] == "my-agent/1.0 sk-***"
    assert last["error_code"] == "key_revoked" and last["key_id"] == kid  # the id it presented, marked revoked
    stored = await running.stored(len(running.rows))
    assert stored[-1]["key_id"] == kid and "client_addr" not in stored[-1]


def printed_lines(proc, until="try:"):
    lines = []
    while not any(line.startswith(until) for line in lines):
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    return lines


async def test_printed_lines_with_a_real_upstream_say_how_to_get_a_key(fake, tmp_path):
    port, proc = serve_once(tmp_path, upstream=fake.url)
    try:
        await wait_listening(port, proc)
        lines = await asyncio.to_thread(printed_lines, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc)
    hint = next(line for line in lines if line.startswith("a key:"))
    assert "sidecar keys create --name me" in hint
    curl = next(line for line in lines if line.startswith("try:"))
    assert "authorization: Bearer $KEY" in curl
    # What the hint says, run as printed from another directory with none of the server's environment.
    command = hint.strip()[len("a key:  KEY=$(") : -1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    made = subprocess.run(["bash", "-c", command], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    port, proc = serve_once(tmp_path, upstream=fake.url)
    try:
        await wait_listening(port, proc)
        args = shlex.split(curl[len("try:  ") :].replace("$KEY", key))
        headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
        url, data = f"http://127.0.0.1:{port}/v1/chat/completions", args[args.index("-d") + 1]
        async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        reap(proc)


async def test_demo_restarts_reuse_one_demo_key(tmp_path):
    keys = []
    for _ in range(2):
        port = free_port()
        env = {**os.environ, "SIDECAR_SERVER_DRAIN_GRACE": "0"}
        for name in ("SIDECAR_UPSTREAM_URL", "SIDECAR_STORE_URL", "SIDECAR_SERVER_DATA_DIR"):
            env.pop(name, None)
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--demo", "--port", str(port)],
                                env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            await wait_listening(port, proc)
            curl = (await asyncio.to_thread(printed_lines, proc))[-1]
            keys.append(re.search(r"Bearer (sk-\S+)'", curl).group(1))
        finally:
            proc.send_signal(signal.SIGTERM)
            reap(proc)
    assert keys[0] == keys[1]
    listed = orjson.loads(cli(tmp_path / "data", "keys", "list", "--format", "json").stdout)
    assert [k["name"] for k in listed] == ["demo"]
    assert oct(os.stat(tmp_path / "data" / "demo-key").st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in (tmp_path / "data").glob("demo-key*")) == ["demo-key"]  # renamed into place
