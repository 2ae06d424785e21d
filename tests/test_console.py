"""The web console (#19) over real sockets: off by default, sessions, cookie flags, CSRF, CSP, roles, and the
series it draws, on SQLite and PostgreSQL. The browser walk-through is tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from tests.support.clients import ADMIN, admin

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


@pytest.fixture(params=["sqlite", "postgres"])
async def console(request, fake, sidecar_factory):
    options = {"auth__enabled": True, "server__admin_token": ADMIN, "console__enabled": True}
    if request.param == "postgres":
        options["store__url"] = request.getfixturevalue("pg_url")
    return await sidecar_factory(fake.url, **options)


def browser() -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1, as a browser does (aiohttp's default jar skips IP hosts)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(session: aiohttp.ClientSession, url: str, token: str) -> tuple[int, dict, aiohttp.ClientResponse]:
    async with session.post(url + "/console/api/session", json={"token": token}) as r:
        return r.status, await r.json(), r


async def test_off_by_default_the_console_is_not_there(fake, sidecar):
    async with browser() as s:
        for path in ("/console/", "/console/api/session", "/console/static/console.js"):
            async with s.get(sidecar.url + path) as r:
                assert r.status == 404, path


async def test_the_page_and_assets_have_a_strict_policy_and_no_inline_script(console):
    html = (ROOT / "sidecar/admin/console_static/index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script
    assert not re.search(r"\sstyle=|\son[a-z]+=", html, re.I)  # no inline styles or event handlers
    async with browser() as s:
        for path in ("/console/", "/console/static/console.js", "/console/static/console.css"):
            async with s.get(console.url + path) as r:
                assert r.status == 200, path
                csp = r.headers["content-security-policy"]
                assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
                assert r.headers["x-content-type-options"] == "nosniff"
        async with s.get(console.url + "/console/static/../app.py") as r:
            assert r.status == 404


async def test_sign_in_gives_an_httponly_strict_cookie_and_a_csrf_token_and_sign_out_ends_it(console):
    async with browser() as s:
        status, body, r = await sign_in(s, console.url, "wrong-token")
        assert status == 401 and "set-cookie" not in r.headers
        status, body, r = await sign_in(s, console.url, ADMIN)
        assert status == 200 and body["role"] == "admin" and len(body["csrf"]) > 20
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie  # plain http here; over TLS it is set
        assert ADMIN not in cookie and ADMIN not in str(body)
        async with s.get(console.url + "/console/api/keys") as r:
            assert r.status == 200
        async with s.delete(console.url + "/console/api/session") as r:
            assert r.status == 403  # a change without the CSRF token
        async with s.delete(console.url + "/console/api/session", headers={"x-csrf-token": body["csrf"]}) as r:
            assert r.status == 200
        async with s.get(console.url + "/console/api/keys") as r:
            assert r.status == 401


async def test_every_change_needs_the_csrf_token_and_a_json_body(console):
    async with browser() as s:
        _, session, _ = await sign_in(s, console.url, ADMIN)
        url = console.url + "/console/api/keys"
        async with s.post(url, json={"name": "no-csrf"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "csrf"
        async with s.post(url, json={"name": "bad-csrf"}, headers={"x-csrf-token": "guess"}) as r:
            assert r.status == 403
        form = {"name": "form"}
        async with s.post(url, data=form, headers={"x-csrf-token": session["csrf"]}) as r:
            assert r.status == 415  # what a cross-site form could send
        async with s.post(url, json={"name": "made-in-console"}, headers={"x-csrf-token": session["csrf"]}) as r:
            created = await r.json()
            assert r.status == 201 and created["key"].startswith("sk-")
        async with s.get(console.url + "/console/api/audit") as r:
            events = (await r.json())["data"]
        assert any(e["target"] == created["id"] and e["actor"].startswith("console:") for e in events)  # logged


async def test_a_key_holder_sees_only_their_own_key_and_usage(console):
    async with browser() as s:
        _, mine, _ = await admin(s, "POST", console.url + "/admin/keys", {"name": "mine", "rpm": 600})
        _, theirs, _ = await admin(s, "POST", console.url + "/admin/keys", {"name": "theirs"})
        for key, n in ((mine["key"], 2), (theirs["key"], 3)):
            for _ in range(n):
                async with s.post(
                    console.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
                ) as r:
                    assert r.status == 200
        await console.stored(5)
    async with browser() as s:
        status, session, _ = await sign_in(s, console.url, mine["key"])
        assert status == 200 and session["role"] == "key" and session["key_id"] == mine["id"]
        async with s.get(console.url + "/console/api/me") as r:
            me = await r.json()
            assert me["id"] == mine["id"] and me["rpm"] == 600 and "key" not in me
        async with s.get(console.url + "/console/api/series?since=1d&bucket=hour&split=model") as r:
            rows = (await r.json())["data"]
        assert sum(row["requests"] for row in rows) == 2  # theirs (3) are not in it
        for path in ("keys", "requests", "usage", "audit", f"keys/{theirs['id']}"):
            async with s.get(console.url + "/console/api/" + path) as r:
                assert r.status == 403, path
        async with s.get(console.url + "/console/api/series?split=key") as r:
            assert r.status == 400


async def test_the_operators_series_split_by_key_model_and_outcome(console):
    async with browser() as s:
        _, one, _ = await admin(s, "POST", console.url + "/admin/keys", {"name": "one", "rpm": 1})
        for _ in range(3):
            async with s.post(
                console.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {one['key']}"}
            ):
                pass
        await console.stored(3)
        await sign_in(s, console.url, ADMIN)
        series = {}
        for split in ("key", "model", "outcome"):
            async with s.get(console.url + f"/console/api/series?since=1d&bucket=day&split={split}") as r:
                assert r.status == 200
                series[split] = (await r.json())["data"]
    outcomes = {row["outcome"]: row["requests"] for row in series["outcome"]}
    assert outcomes == {"completed": 1, "rate_limited": 2}
    assert {row["key"] for row in series["key"]} == {one["id"]}
    assert sum(row["total_tokens"] for row in series["model"]) == 16
    assert all(row["t"] % 86400 == 0 for rows in series.values() for row in rows)


@pytest.fixture
async def plain(fake, sidecar_factory):
    async def start(**options):
        return await sidecar_factory(
            fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True, **options
        )

    return start


async def test_a_revoked_keys_session_ends_at_once_and_a_key_holds_at_most_five(plain):
    running = await plain()
    async with browser() as s:
        _, key, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "soon-revoked"})
    sessions = []
    for _ in range(6):
        holder = browser()
        sessions.append(holder)
        assert (await sign_in(holder, running.url, key["key"]))[0] == 200
    try:
        statuses = []
        for holder in sessions:
            async with holder.get(running.url + "/console/api/me") as r:
                statuses.append(r.status)
        assert statuses == [401, 200, 200, 200, 200, 200]  # the oldest of six went
        async with browser() as s:
            await admin(s, "DELETE", running.url + f"/admin/keys/{key['id']}")
        async with sessions[-1].get(running.url + "/console/api/me") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "console_session"
    finally:
        for holder in sessions:
            await holder.close()


async def test_with_an_ops_port_operators_sign_in_there_only(plain):
    from tests.support.waits import free_port

    ops = free_port()
    running = await plain(server__ops_port=ops)
    async with browser() as s:
        _, key, _ = await admin(s, "POST", f"http://127.0.0.1:{ops}/admin/keys", {"name": "holder"})
        status, body, _ = await sign_in(s, running.url, ADMIN)  # not compared there: as wrong as any wrong key
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        assert (await sign_in(s, running.url, key["key"]))[0] == 200
        async with s.get(running.url + "/console/api/keys") as r:
            assert r.status == 404  # no operator routes on the client port at all
    async with browser() as s:
        assert (await sign_in(s, f"http://127.0.0.1:{ops}", ADMIN))[0] == 200
        async with s.get(f"http://127.0.0.1:{ops}/console/api/keys") as r:
            assert r.status == 200
        assert (await sign_in(s, f"http://127.0.0.1:{ops}", key["key"]))[0] == 401


async def test_failed_sign_ins_are_counted_and_limited_and_bad_csrf_is_a_403_not_a_500(plain):
    running = await plain()
    async with browser() as s:
        statuses = [(await sign_in(s, running.url, f"wrong-{n}"))[0] for n in range(11)]
        assert statuses == [401] * 10 + [429]
        async with s.get(running.url + "/metrics") as r:
            assert "sidecar_admin_auth_failures_total 10.0" in await r.text()
    running2 = await plain()
    async with browser() as s:
        await sign_in(s, running2.url, ADMIN)
        async with s.post(
            running2.url + "/console/api/keys", json={"name": "x"}, headers={"x-csrf-token": "ünïcode"}
        ) as r:
            assert r.status == 403
            assert r.headers["cache-control"] == "no-store"  # errors too
        async with s.get(running2.url + "/console/api/keys") as r:
            assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"


async def test_the_cookie_is_secure_when_a_trusted_proxy_says_https(plain):
    running = await plain(server__trusted_proxies=("127.0.0.1/32",))
    async with browser() as s:
        async with s.post(
            running.url + "/console/api/session", json={"token": ADMIN}, headers={"x-forwarded-proto": "https"}
        ) as r:
            assert "Secure" in r.headers["set-cookie"]
    untrusted = await plain()
    async with browser() as s:
        async with s.post(
            untrusted.url + "/console/api/session", json={"token": ADMIN}, headers={"x-forwarded-proto": "https"}
        ) as r:
            assert "Secure" not in r.headers["set-cookie"]  # anyone can send that header


async def test_a_series_keeps_the_largest_groups_and_folds_the_rest(plain, fake):
    running = await plain()
    async with browser() as s:
        _, key, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "many-models"})
        for n in range(15):
            body = {**CHAT, "model": f"model-{n:02d}"}
            async with s.post(
                running.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key['key']}"}
            ) as r:
                assert r.status == 200
        await running.stored(15)
        await sign_in(s, running.url, ADMIN)
        async with s.get(running.url + "/console/api/series?since=1d&split=model") as r:
            rows = (await r.json())["data"]
    groups = {row["model"] for row in rows}
    assert len(groups) == 13 and "other" in groups
    assert sum(row["requests"] for row in rows) == 15


async def test_failed_sign_ins_lock_out_one_client_on_one_port_only(plain):
    """Counted per client address (behind a trusted proxy: the one it names) and per port: a guesser locks out
    neither the proxy's other clients nor the operator on the ops port."""
    from tests.support.waits import free_port

    ops = free_port()
    running = await plain(server__ops_port=ops, server__trusted_proxies=("127.0.0.1/32",))
    async with browser() as s:
        _, key, _ = await admin(s, "POST", f"http://127.0.0.1:{ops}/admin/keys", {"name": "holder"})
    async with browser() as s:
        statuses = [(await sign_in(s, running.url, f"sk-wrong-{n}"))[0] for n in range(11)]
        assert statuses == [401] * 10 + [429]
        async with s.post(
            running.url + "/console/api/session", json={"token": key["key"]}, headers={"x-forwarded-for": "203.0.113.9"}
        ) as r:
            assert r.status == 200  # another client behind the same proxy
    async with browser() as s:
        assert (await sign_in(s, f"http://127.0.0.1:{ops}", ADMIN))[0] == 200  # the same address, the ops port


async def test_a_session_holds_on_its_own_port_and_each_role_has_its_cookie(plain):
    """Browsers send a host's cookies to all its ports: the operator's session must not work on the client port,
    and a key holder signing in there must not sign the operator out of the ops port."""
    from tests.support.waits import free_port

    ops = free_port()
    running = await plain(server__ops_port=ops)
    ops_url = f"http://127.0.0.1:{ops}"
    async with browser() as s:
        _, key, _ = await admin(s, "POST", ops_url + "/admin/keys", {"name": "holder"})
        assert (await sign_in(s, ops_url, ADMIN))[0] == 200
        async with s.get(running.url + "/console/api/series?split=key") as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "console_session"  # as with none
        async with s.get(running.url + "/console/api/session") as r:
            assert (await r.json())["role"] is None
        assert (await sign_in(s, running.url, key["key"]))[0] == 200
        async with s.get(running.url + "/console/api/me") as r:
            assert r.status == 200
        async with s.get(ops_url + "/console/api/keys") as r:
            assert r.status == 200  # the operator is still signed in on the ops port
        async with s.get(ops_url + "/console/api/session") as r:
            assert (await r.json())["role"] == "admin"


async def test_the_cookie_max_age_follows_the_sliding_session(plain):
    running = await plain(console__session_ttl=120, console__session_max_age=100_000)
    async with browser() as s:
        _, _, r = await sign_in(s, running.url, ADMIN)
        assert "Max-Age=120" in r.headers["set-cookie"]
        async with s.get(running.url + "/console/api/keys") as r:
            assert r.status == 200 and "Max-Age=120" in r.headers.get("set-cookie", "")  # renewed with the session
    capped = await plain(console__session_ttl=120, console__session_max_age=50)
    async with browser() as s:
        _, _, r = await sign_in(s, capped.url, ADMIN)
        max_age = int(r.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
        assert 0 < max_age <= 50  # never past what the session has left


def static_key(tmp_path: Path, name: str) -> tuple[str, str, dict]:
    """A key of `auth.static_keys_file` (its pepper in tmp_path/pepper): the key, its id, the sidecar's options."""
    import orjson

    from sidecar.keys.format import hash_secret, new_key

    pepper = b"static-pepper-0123456789"
    (tmp_path / "pepper").write_bytes(pepper + b"\n")
    key, kid, secret = new_key()
    line = {"id": kid, "name": name, "hash": hash_secret(pepper, secret), "created_at": 1.0}
    (tmp_path / "static.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    return (
        key,
        kid,
        {"auth__pepper_file": str(tmp_path / "pepper"), "auth__static_keys_file": str(tmp_path / "static.jsonl")},
    )


async def test_every_key_id_the_console_shows_comes_with_the_keys_name(fake, sidecar_factory, tmp_path):
    """Three keys, one of them static, and some traffic: top keys, the chart's split by key, the request log, the
    queue, the admin audit log and the audit records name each key (joined by the server: the page loads no list of
    keys to find them)."""
    gamma, gamma_id, options = static_key(tmp_path, "gamma")
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True, audit__capture="all",
        audit__sinks="db", **options,
    )  # fmt: skip
    async with browser() as s:
        _, alpha, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "alpha"})
        _, beta, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "beta"})
        for key, n in ((alpha["key"], 1), (beta["key"], 2), (gamma, 3)):
            for _ in range(n):
                async with s.post(
                    running.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
                ) as r:
                    assert r.status == 200
        await running.stored(6)
        await sign_in(s, running.url, ADMIN)

        async def get(path: str) -> list[dict]:
            async with s.get(running.url + "/console/api/" + path) as r:
                assert r.status == 200, path
                return (await r.json())["data"]

        names = {alpha["id"]: "alpha", beta["id"]: "beta", gamma_id: "gamma"}
        assert {row["key"]: row["name"] for row in await get("usage?since=1d&by=key")} == names
        assert {row["key"]: row["name"] for row in await get("series?since=1d&split=key")} == names
        assert {row["key_id"]: row["key_name"] for row in await get("requests?since=1d")} == names
        assert {row["key_id"]: row["key_name"] for row in await get("queue")} == names
        assert {row["target"]: row["target_name"] for row in await get("audit")} == {
            alpha["id"]: "alpha", beta["id"]: "beta"
        }  # fmt: skip
        for _ in range(200):  # the db sink writes in batches, after the request log
            records = await get("audit-records?since=1d")
            if len(records) == 6:
                break
            await asyncio.sleep(0.05)
        assert {row["key_id"]: row["key_name"] for row in records} == names
        assert all("name" not in row for row in await get("usage?since=1d&by=model"))


async def test_every_field_of_a_key_changes_through_the_console_with_csrf_and_in_the_audit_log(console):
    """The console's edit dialog sends what the admin API takes: every field, through `KeyAdmin.update`, each change
    an admin audit row naming the console as the actor."""
    import time

    async with browser() as s:
        _, session, _ = await sign_in(s, console.url, ADMIN)
        csrf = {"x-csrf-token": session["csrf"]}
        async with s.post(console.url + "/console/api/keys", json={"name": "before"}, headers=csrf) as r:
            kid = (await r.json())["id"]
        url = f"{console.url}/console/api/keys/{kid}"
        change = {
            "name": "after", "rpm": 60, "tpm": 5000, "concurrency": 3, "budget_tokens": 90000, "budget_period": "week",
            "models": ["fake-model", "other-model"], "audit": "on", "weight": 2.5, "priority": "high",
            "cache_group": "team-a",
        }  # fmt: skip
        async with s.patch(url, json={**change, "expires_in": "30d"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "csrf"  # no token: nothing changed
        async with s.patch(url, json={**change, "expires_in": "30d"}, headers=csrf) as r:
            assert r.status == 200
            row = await r.json()
        assert {k: row[k] for k in change} == change
        assert abs(row["expires_at"] - (time.time() + 30 * 86400)) < 60
        async with s.patch(url, json={"expires_in": "never", "audit": None, "priority": None}, headers=csrf) as r:
            row = await r.json()
            assert (row["expires_at"], row["audit"], row["priority"]) == (None, None, None)
        async with s.get(console.url + "/console/api/audit") as r:
            events = [e for e in (await r.json())["data"] if e["target"] == kid and e["action"] == "key.update"]
    assert len(events) == 2 and all(e["actor"].startswith("console:") for e in events)
    newest, first = events  # newest first
    assert newest["changes"] == {"expires_at": None, "audit": None, "priority": None}
    assert {k: first["changes"][k] for k in change} == change and first["changes"]["expires_at"] > time.time()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": 0}, "`weight` must be a number above 0 and at most 1000, or null."),
        ({"budget_tokens": 1000}, "`budget_tokens` and `budget_period` are set together."),
        ({"tpm": "lots"}, "`tpm` must be a non-negative integer or null."),
        ({"expires_in": "soon"}, "Invalid duration 'soon': use e.g. 30d, 12h, 15m (at most a century)."),
        ({"name": ""}, "`name` must be a string of 1-200 characters."),
        ({"colour": "red"}, "Unknown field 'colour'."),
    ],
)
async def test_a_bad_value_through_the_console_gets_the_admin_apis_400_and_changes_nothing(
    fake, sidecar_factory, change, message
):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True)
    async with browser() as s:
        _, key, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "kept", "tpm": 10})
        _, session, _ = await sign_in(s, running.url, ADMIN)
        url = f"{running.url}/console/api/keys/{key['id']}"
        async with s.patch(url, json=change, headers={"x-csrf-token": session["csrf"]}) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == message
            assert r.headers["content-security-policy"].startswith("default-src 'none'")
        async with s.get(url) as r:
            row = await r.json()
            assert (row["name"], row["tpm"], row["updated_at"]) == ("kept", 10, key["updated_at"])


async def test_a_static_key_is_not_changed_through_the_console(fake, sidecar_factory, tmp_path):
    _, kid, options = static_key(tmp_path, "from-a-file")
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True, **options
    )
    async with browser() as s:
        _, session, _ = await sign_in(s, running.url, ADMIN)
        url = f"{running.url}/console/api/keys/{kid}"
        async with s.patch(url, json={"rpm": 5}, headers={"x-csrf-token": session["csrf"]}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "static_key"
