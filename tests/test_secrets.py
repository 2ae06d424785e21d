"""Secrets stay secret: not in any log line (whoever writes it), not in error bodies, not in the startup line;
no version in `Server`; a client cannot choose the address the upstream sees; the demo mints no key in a
real store; a short pepper is refused; admin token failures are counted and logged (without the token)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from sidecar.ops.logs import _AGENTS, RequestLog
from tests.support.bodies import CHAT
from tests.support.clients import raw
from tests.support.fake_upstream import FAKE_CONTENT_TYPE, FAKE_DATE
from tests.support.processes import reap
from tests.support.waits import free_port, wait_listening

KEY = "sk-sc-secretsecret-ABCDEFGHIJKLMNOP"
ADMIN = "admin-token-0123456789"


def sidecar(tmp_path: Path, *args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen[str]:
    full = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/s.db",
        "SIDECAR_SERVER_DRAIN_GRACE": "0",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args],
        env=full,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


HOSTILE = [
    b"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer " + KEY.encode() + b"\n\n",  # bare LF
    b"GET /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode() + b"\x01x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY.encode() + b"\r\nX-A: \x7f\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"\r\n"
    + b"X: "
    + b"a" * 9000
    + b"\r\n\r\n",
]


async def test_unparseable_heads_are_answered_and_logged_without_the_head(fake, tmp_path):
    port = free_port()
    proc = sidecar(
        tmp_path,
        "serve",
        "--port",
        str(port),
        SIDECAR_UPSTREAM_URL=fake.url,
        SIDECAR_SERVER_ADMIN_TOKEN=ADMIN,
        SIDECAR_SERVER_LOG_LEVEL="debug",
    )
    try:
        await wait_listening(port, proc)
        for request in HOSTILE:
            answer = await raw(port, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") or head.startswith(b"HTTP/1.0 400"), head
            assert b"content-type: application/json" in head.lower() and b"aiohttp" not in head.lower()
            error = orjson.loads(body)["error"]
            assert error["code"] == "malformed_request" and "Malformed HTTP request" in error["message"]
            assert KEY.encode() not in answer and ADMIN.encode() not in answer and b"Bearer" not in answer
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err
    assert err.count("unparseable request") == len(HOSTILE)
    logged = "\n".join(line for line in err.splitlines() if not line.startswith("try:"))  # the curl hint's $KEY
    assert KEY not in err and ADMIN not in err and "secretsecret" not in err and "Bearer" not in logged


async def test_credentials_in_urls_are_masked_in_every_start_line(fake, tmp_path):
    port = free_port()
    upstream = fake.url.replace("http://", "http://bob:upstream-pw-123@")
    proc = sidecar(tmp_path, "serve", "--port", str(port), SIDECAR_UPSTREAM_URL=upstream)
    try:
        await wait_listening(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert "upstream-pw-123" not in err and "bob:***@" in err
    # A PostgreSQL URL with its password in the query, nothing listening there: the sidecar starts (a store
    # outage at start is ridden out) and names the store in its warning, without the password.
    bad = sidecar(
        tmp_path,
        "serve",
        "--port",
        str(port),
        SIDECAR_UPSTREAM_URL=fake.url,
        SIDECAR_STORE_URL=f"postgresql://bob@127.0.0.1:{free_port()}/db?password=hunter2-pw&connect_timeout=1",
    )
    try:
        await wait_listening(port, bad)
    finally:
        bad.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(bad.communicate, timeout=60)
    assert "store unreachable at start" in err and "hunter2-pw" not in err and "password=***" in err


async def test_a_store_that_refuses_the_credentials_exits_1_with_one_line(fake, tmp_path, pg_url):
    """Wrong credentials are the configuration's fault, not an outage: one line, exit 1, no password."""
    port = free_port()
    url = pg_url.replace("postgresql://postgres@", "postgresql://nosuchrole@") + "?password=hunter2-pw"
    bad = sidecar(tmp_path, "serve", "--port", str(port), SIDECAR_UPSTREAM_URL=fake.url, SIDECAR_STORE_URL=url)
    _, err = await asyncio.to_thread(bad.communicate, timeout=60)
    assert bad.returncode == 1 and err.strip().splitlines()[-1].startswith("sidecar: cannot open the store"), err
    assert 'role "nosuchrole" does not exist' in err and "hunter2-pw" not in err


async def test_a_taken_port_exits_1_with_one_line(fake, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = sidecar(tmp_path, "serve", "--port", str(port), SIDECAR_UPSTREAM_URL=fake.url)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == f"sidecar: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in err


async def test_the_demo_refuses_a_store_that_is_not_the_default(tmp_path, pg_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--demo", "--port", str(free_port()), "--db", pg_url],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sidecar: configuration error: store.url: the demo upstream runs only")
    from sidecar.store import open_store

    store = open_store(pg_url)
    await store.open()
    try:
        await store.migrate()
        assert await store.list_keys() == []  # no key was minted there
    finally:
        await store.close()


def test_serve_without_an_upstream_is_an_error_not_a_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(free_port())],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "sidecar: configuration error: upstream.url: not set: give --upstream URL (or --demo to try the bundled "
        "demo upstream)"
    )
    assert not (tmp_path / "data").exists()  # nothing was started, nothing was written


@pytest.mark.parametrize("pepper", ["", "short"])
def test_an_empty_or_short_pepper_file_is_refused(tmp_path, pepper):
    path = tmp_path / "pepper-secret"
    path.write_text(pepper + "\n")
    proc = sidecar(tmp_path, "keys", "create", "--name", "x", SIDECAR_AUTH_PEPPER_FILE=str(path))
    out, err = proc.communicate(timeout=60)
    reap(proc)
    assert proc.returncode == 2 and "auth.pepper_file" in err and "at least 16" in err
    assert "sk-" not in out


async def test_server_header_is_the_upstreams_or_the_operators_never_aiohttps(fake, sidecar_factory):
    """Relayed answers keep the upstream's `Server` (and `Date`); our own name none; `server.server_header` names
    every answer."""
    fake_server = "Python/3.11 aiohttp"  # the fake upstream is an aiohttp app: its header, passed on
    running = await sidecar_factory(fake.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.headers["server"].startswith(fake_server) and r.headers["date"] == FAKE_DATE
            assert r.headers["content-type"] == FAKE_CONTENT_TYPE  # parameters exactly as the upstream spelled them
        for method, path in (("GET", "/healthz"), ("GET", "/nope"), ("GET", "/v1/chat/completions")):
            async with s.request(method, running.url + path) as r:
                assert r.headers.getall("server") == [""], (path, r.headers.getall("server"))
    named = await sidecar_factory(fake.url, server__server_header="gateway")
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/healthz"), ("GET", "/nope")):
            async with s.request(method, named.url + path, json=CHAT) as r:
                assert r.headers.getall("server") == ["gateway"], (path, r.headers.getall("server"))


async def test_forwarded_for_is_the_peer_unless_a_trusted_proxy_sent_it(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    spoof = {
        "x-forwarded-for": "6.6.6.6",
        "forwarded": "for=6.6.6.6",
        "x-real-ip": "6.6.6.6",
        "x-forwarded-proto": "https",
    }
    async with aiohttp.ClientSession() as s, s.post(running.url + "/v1/chat/completions", json=CHAT, headers=spoof):
        pass
    seen = fake.last().headers
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "forwarded" not in seen and "x-real-ip" not in seen and "x-forwarded-proto" not in seen
    trusting = await sidecar_factory(fake.url, server__trusted_proxies=["127.0.0.0/8"])
    async with aiohttp.ClientSession() as s, s.post(trusting.url + "/v1/chat/completions", json=CHAT, headers=spoof):
        pass
    seen = fake.last().headers
    assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1" and seen["x-forwarded-proto"] == "https"
    assert "forwarded" not in seen


async def test_admin_token_failures_are_counted_and_logged_without_the_token(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        for token in ("wrong-token-one", "wrong-token-two", None):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            async with s.get(running.url + "/admin/keys", headers=headers) as r:
                assert r.status == 401
        async with s.get(running.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
        async with s.get(running.url + "/metrics") as r:
            assert "sidecar_admin_auth_failures_total 3.0" in await r.text()
    log = running.log_text()
    assert log.count("admin token rejected") == 2 and log.count("admin request without a token") == 1
    assert "wrong-token" not in log and ADMIN not in log


async def test_usage_csv_neutralises_spreadsheet_formulas(fake, sidecar_factory, tmp_path):
    db = f"sqlite:///{tmp_path}/u.db"
    running = await sidecar_factory(fake.url, store__url=db)
    async with aiohttp.ClientSession() as s:
        for model in ('=HYPERLINK("http://evil","x")', "+1", "@SUM(A1)", "-2", "plain"):
            async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "model": model}) as r:
                assert r.status == 200
    await running.stored(5)
    env = {**os.environ, "SIDECAR_STORE_URL": db, "SIDECAR_SERVER_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "usage", "--by", "model", "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    cells = {row["model"] for row in csv.DictReader(io.StringIO(out))}
    assert cells == {'\'=HYPERLINK("http://evil","x")', "'+1", "'@SUM(A1)", "'-2", "plain"}, cells


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://TOKEN-abc123@host/v1", "TOKEN-abc123"),
        ("postgresql://bob:pw-777@h/db", "pw-777"),
        ("postgresql://bob@h/db?password=pw-888&sslmode=require", "pw-888"),
        ("postgresql://h/db?sslpassword=pw-999", "pw-999"),
        ("http://h/v1?api-key=k-111&sig=s-222", "k-111"),
        ("htp://u:pw-333@h", "pw-333"),
    ],
)
def test_every_credential_in_a_url_is_masked(url, secret):
    from sidecar.config import ConfigError, load, mask_url
    from sidecar.ops.logs import scrub

    assert secret not in mask_url(url) and secret not in scrub(f"connecting to {url} failed")
    if url.startswith("htp"):
        with pytest.raises(ConfigError) as raised:
            load(None, {}, {"upstream.url": url})
        assert secret not in str(raised.value)


async def test_a_store_that_answers_but_cannot_be_migrated_exits_1_with_one_line(fake, tmp_path, pg_url):
    """A role without CREATE on the schema (PostgreSQL 15's default for non-owners): not an outage to ride
    out, a configuration to fix. One line, exit 1."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("CREATE ROLE visitor LOGIN")
    try:
        url = pg_url.replace("postgresql://postgres@", "postgresql://visitor@")
        port = str(free_port())
        bad = sidecar(tmp_path, "serve", "--port", port, SIDECAR_UPSTREAM_URL=fake.url, SIDECAR_STORE_URL=url)
        _, err = await asyncio.to_thread(bad.communicate, timeout=60)
        assert bad.returncode == 1 and err.strip().splitlines()[-1].startswith("sidecar: cannot open the store"), err
        assert "InsufficientPrivilege" in err
    finally:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute("DROP ROLE visitor")


def test_a_user_agent_holding_a_key_is_scrubbed_on_every_line_it_comes_back_on(tmp_path):
    """The request log remembers each user agent's scrubbed text (the patterns cost more than the rest of the
    line): the second line of the same agent, and an agent that comes after the memory was emptied, are scrubbed
    as the first."""
    path = tmp_path / "requests.log"
    log = RequestLog(str(path), flush_ms=0)
    agent = "curl/8 Authorization: Bearer sk-live-abcdefghijklmnop"
    row = orjson.dumps({"request_id": "req_1"})
    for _ in range(2):
        log.write_access(row, 1.0, "127.0.0.1", agent)
    for i in range(_AGENTS):
        log.write_access(row, 1.0, "127.0.0.1", f"agent-{i}")
    log.write_access(row, 1.0, "127.0.0.1", agent)
    log.close()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    mine = [line["user_agent"] for line in lines if line["user_agent"].startswith("curl/")]
    assert len(mine) == 3 and all("sk-live" not in a and "***" in a for a in mine)
    assert lines[0]["request_id"] == "req_1" and lines[0]["client_addr"] == "127.0.0.1"
