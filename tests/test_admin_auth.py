"""The admin token's defences (#27): wrong tokens are throttled per client address and port (the real client's,
behind a trusted proxy), a token that is not UTF-8 is a 401 like any wrong one, a short token is refused at start,
and the admin audit log names the operator's address, not the proxy's. The throttle's table stays bounded
without ever starting over."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from tests.support.clients import ADMIN, admin, raw
from tests.support.processes import cli
from tests.support.waits import free_port

PROXY = ("127.0.0.1/32",)  # the test client is the trusted proxy: X-Forwarded-For names the client


def via(address: str) -> dict[str, str]:
    return {"x-forwarded-for": address}


async def keys(session: aiohttp.ClientSession, url: str, token: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    async with session.get(url + "/admin/keys", headers={"authorization": f"Bearer {token}", **headers}) as r:
        await r.read()
        return r


async def test_wrong_admin_tokens_are_throttled_per_client_address(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__admin_token=ADMIN, server__trusted_proxies=PROXY)
    async with aiohttp.ClientSession() as s:
        statuses = [
            (await keys(s, running.url, f"guess-{n:02d}-0123456789", via("203.0.113.7"))).status for n in range(10)
        ]
        assert statuses == [401] * 10
        async with s.get(
            running.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN}", **via("203.0.113.7")}
        ) as r:
            body = await r.json()  # the right token too: else each 429 would say "wrong", and guessing go on
            assert r.status == 429 and 1 <= int(r.headers["retry-after"]) <= 60
            assert body["error"]["code"] == "too_many_failures"
            assert set(body["error"]) == {"message", "type", "param", "code"}  # OpenAI's shape
        # The proxy's other clients, and the proxy itself, are not locked out with the guesser.
        assert (await keys(s, running.url, ADMIN, via("203.0.113.8"))).status == 200
        assert (await keys(s, running.url, ADMIN, {})).status == 200
        async with s.get(running.url + "/metrics") as r:
            assert "sidecar_admin_auth_failures_total 10.0" in await r.text()


async def test_an_admin_token_that_is_not_utf8_is_a_401_and_counted(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__admin_token=ADMIN)
    token = b"\xff\xfe-0123456789abcdef"  # not UTF-8
    request = (
        b"GET /admin/keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer " + token + b"\r\n\r\n"
    )
    answers = [await raw(running.port, request) for _ in range(11)]
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert orjson.loads(body)["error"]["code"] == "invalid_admin_token"
    assert [a.split(b" ", 2)[1] for a in answers] == [b"401"] * 10 + [b"429"]  # the throttle counted them
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        assert "sidecar_admin_auth_failures_total 10.0" in await r.text()


async def test_the_admin_audit_log_names_the_operator_not_the_proxy(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, server__trusted_proxies=PROXY
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(
            running.url + "/admin/keys",
            json={"name": "from-behind-a-proxy"},
            headers={"authorization": f"Bearer {ADMIN}", **via("198.51.100.4")},
        ) as r:
            created = await r.json()
            assert r.status == 201
        _, events, _ = await admin(s, "GET", running.url + "/admin/audit")
    actors = [e["actor"] for e in events["data"] if e["target"] == created["id"]]
    assert actors == ["admin-api:198.51.100.4"]


def test_a_short_inline_admin_token_is_refused(tmp_path):
    from sidecar.config import ConfigError
    from tests.support.sidecars import make_settings

    with pytest.raises(ConfigError, match=r"server\.admin_token: the admin token has 1 characters; at least 16"):
        make_settings("http://127.0.0.1:1/v1", tmp_path, server__admin_token="x")
    assert make_settings("http://127.0.0.1:1/v1", tmp_path, server__admin_token="a" * 16).server.admin_token


@pytest.mark.parametrize("token", ["", "short-token"])
def test_a_short_admin_token_file_stops_the_start(fake, tmp_path, token):
    path = tmp_path / "admin-token"
    path.write_text(token + "\n")
    done = cli(
        tmp_path, "serve", "--port", str(free_port()),
        SIDECAR_UPSTREAM_URL=fake.url, SIDECAR_SERVER_ADMIN_TOKEN_FILE=str(path),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"server.admin_token_file: the admin token has {len(token)} characters; at least 16" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_throttle_forgets_the_oldest_source_one_at_a_time():
    """At its bound the throttle forgets the source whose last failure is oldest, never the whole table: a flood
    of new addresses must not hand a locked-out source its tries back."""
    from sidecar.admin.throttle import Throttle

    now = [0.0]
    throttle = Throttle(lambda request: None, per_minute=2, addresses=3, clock=lambda: now[0])
    for source in [(1, "a"), (1, "a"), (1, "b"), (1, "b"), (2, "b"), (2, "b")]:
        throttle.count(source)
    assert [throttle.retry_after(s) > 0 for s in [(1, "a"), (1, "b"), (2, "b")]] == [True, True, True]
    throttle.count((1, "c"))  # a fourth source: "a" (the oldest failure) goes, the others stay locked
    assert len(throttle) == 3
    assert throttle.retry_after((1, "a")) == 0 and throttle.retry_after((1, "b")) == 60
    assert throttle.retry_after((2, "b")) == 60  # per port: the same address elsewhere is its own source
    now[0] = 60.0  # a minute on: the window is over
    assert throttle.retry_after((1, "b")) == 0
