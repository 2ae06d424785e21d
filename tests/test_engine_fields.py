"""What the sidecar writes into a vLLM body for the key that sent it: the prefix-cache salt
(`upstream.cache_salt = "key"`) and the scheduling priority (`limits.forward_priority`), read from what the fake
upstream received. Off, the client's bytes go upstream as they were sent."""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest

from sidecar.keys.format import hash_secret, new_key, parse_key
from tests.support.clients import ADMIN, admin

CHAT = {"model": "m", "messages": [{"role": "user", "content": "the shared system prompt"}], "max_tokens": 5}
SALT = re.compile(r"[A-Za-z0-9_-]{43}")


def key_id(key: str) -> str:
    parsed = parse_key(key)
    assert parsed is not None
    return parsed[0]


async def keyed(fake, sidecar_factory, **options):
    return await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, upstream__kind="vllm", **options
    )


async def make_key(url: str, name: str, **fields) -> str:
    async with aiohttp.ClientSession() as s:
        status, created, _ = await admin(s, "POST", url + "/admin/keys", {"name": name, **fields})
    assert status == 201, created
    return created["key"]


async def post(url: str, key: str | None, body: dict | bytes, path: str = "/v1/chat/completions"):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, data=data, headers={**headers, "content-type": "application/json"}) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if r.content_type == "application/json" else raw


async def forwarded(fake, url: str, key: str | None, body: dict | bytes, path: str = "/v1/chat/completions"):
    """The body the upstream received for one request."""
    status, answer = await post(url, key, body, path)
    assert status == 200, answer
    return fake.received[-1].json


async def test_each_key_has_its_own_salt_and_a_cache_group_shares_one(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, upstream__cache_salt="key")
    a, b = await make_key(running.url, "a"), await make_key(running.url, "b")
    team1 = await make_key(running.url, "team-1", cache_group="team")
    team2 = await make_key(running.url, "team-2", cache_group="team")
    lone = await make_key(running.url, "lone", cache_group=key_id(a))  # a group named like a's id
    salts = {}
    for name, key in (("a", a), ("b", b), ("team1", team1), ("team2", team2), ("lone", lone)):
        salts[name] = (await forwarded(fake, running.url, key, {**CHAT, "cache_salt": "chosen-by-the-client"}))[
            "cache_salt"
        ]
    assert all(SALT.fullmatch(s) for s in salts.values()), salts  # 256 bits, as vLLM recommends
    assert salts["team1"] == salts["team2"]
    assert len({salts["a"], salts["b"], salts["team1"], salts["lone"]}) == 4
    for key in (a, b, team1, team2, lone):  # neither the key, its id nor its secret shows
        for part in [key, *(parse_key(key) or ())]:
            assert all(part not in s for s in salts.values())
    assert "chosen-by-the-client" not in str(fake.received[-1].body)


async def test_the_salt_goes_into_every_body_vllm_salts(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, upstream__cache_salt="key")
    key = await make_key(running.url, "k")
    salt = (await forwarded(fake, running.url, key, CHAT))["cache_salt"]
    completion = {"model": "m", "prompt": "p", "max_tokens": 5}
    assert (await forwarded(fake, running.url, key, completion, "/v1/completions"))["cache_salt"] == salt
    assert (await forwarded(fake, running.url, key, {"model": "m", "input": "x"}, "/v1/responses"))[
        "cache_salt"
    ] == salt
    assert (await forwarded(fake, running.url, key, CHAT, "/invocations"))["cache_salt"] == salt  # read as chat
    streamed = await forwarded(fake, running.url, key, {**CHAT, "stream": True, "cache_salt": ""})
    assert streamed["cache_salt"] == salt and streamed["stream_options"] == {"include_usage": True}
    # vLLM's Messages endpoint carries no salt into the request it makes: nothing is written there
    messages = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    sent = orjson.dumps(messages)
    await post(running.url, key, sent, "/v1/messages")
    assert fake.received[-1].body == sent


async def test_salts_hold_across_restarts_and_change_with_the_pepper(fake, sidecar_factory, tmp_path):
    """One static key (same id and secret) served by three sidecars of their own data dirs: two with one pepper
    (a restart: nothing kept but the pepper), one with another."""
    key, kid, secret = new_key()

    async def salt_under(pepper: str, name: str) -> str:
        home = tmp_path / name
        home.mkdir()
        static = home / "keys.jsonl"
        row = {"id": kid, "name": "k", "hash": hash_secret(pepper.encode(), secret), "created_at": 1.0}
        static.write_bytes(orjson.dumps(row) + b"\n")
        running = await sidecar_factory(
            fake.url,
            auth__enabled=True,
            auth__pepper=pepper,
            auth__static_keys_file=str(static),
            upstream__cache_salt="key",
            server__data_dir=str(home),
            store__url=f"sqlite:///{home}/sidecar.db",
            server__request_log=str(home / "requests.jsonl"),
        )
        return str((await forwarded(fake, running.url, key, CHAT))["cache_salt"])

    first = await salt_under("pepper-one-0123456789abcdef", "first")
    again = await salt_under("pepper-one-0123456789abcdef", "again")
    other = await salt_under("pepper-two-0123456789abcdef", "other")
    assert first == again and SALT.fullmatch(first)
    assert other != first and SALT.fullmatch(other)


async def test_without_keys_no_salt_is_written(fake, sidecar_factory):
    """Auth off: the sidecar cannot tell tenants apart; a client's own salt goes through as sent."""
    running = await sidecar_factory(fake.url, upstream__cache_salt="key", upstream__kind="vllm")
    sent = orjson.dumps({**CHAT, "cache_salt": "the-clients-own"})
    await post(running.url, None, sent)
    assert fake.received[-1].body == sent


async def test_off_the_body_goes_upstream_byte_for_byte(fake, sidecar_factory):
    """Both options at their defaults: no rewrite, however the client spelled its body. A guard of the fast
    path (it held before these options too)."""
    running = await keyed(fake, sidecar_factory)
    key = await make_key(running.url, "k", priority="high", cache_group="g")
    sent = b'{ "model" : "m", "priority": -99, "cache_salt":"x",\n "messages": [{"role":"user","content":"hi"}]}'
    await post(running.url, key, sent)
    assert fake.received[-1].body == sent


@pytest.mark.parametrize(("priority", "value"), [("high", -10), ("normal", 0), ("low", 10)])
async def test_a_keys_class_is_forwarded_as_vllms_priority(fake, sidecar_factory, priority, value):
    running = await keyed(fake, sidecar_factory, limits__forward_priority=True)
    key = await make_key(running.url, priority, priority=priority)
    assert (await forwarded(fake, running.url, key, CHAT))["priority"] == value
    assert (await forwarded(fake, running.url, key, {**CHAT, "priority": None}))["priority"] == value
    completion = {"model": "m", "prompt": "p", "max_tokens": 5}
    assert (await forwarded(fake, running.url, key, completion, "/v1/completions"))["priority"] == value
    assert (await forwarded(fake, running.url, key, {"model": "m", "input": "x"}, "/v1/responses"))["priority"] == value
    assert (await forwarded(fake, running.url, key, completion, "/invocations"))["priority"] == value


async def test_a_client_may_yield_within_its_class_but_never_outrank_it(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, limits__forward_priority=True, upstream__cache_salt="key")
    low = await make_key(running.url, "low", priority="low")
    high = await make_key(running.url, "high", priority="high")
    jumped = await forwarded(fake, running.url, low, {**CHAT, "priority": -1000})
    assert jumped["priority"] == 10 and SALT.fullmatch(jumped["cache_salt"])  # both fields, one body
    assert (await forwarded(fake, running.url, low, {**CHAT, "priority": 11}))["priority"] == 11
    assert (await forwarded(fake, running.url, high, {**CHAT, "priority": 5}))["priority"] == 5
    assert (await forwarded(fake, running.url, high, {**CHAT, "priority": -11}))["priority"] == -10


@pytest.mark.parametrize("bad", ["5", True, 1.5, 1e30, [1], {"p": 1}])
async def test_a_priority_that_is_not_an_integer_is_a_400(fake, sidecar_factory, bad):
    running = await keyed(fake, sidecar_factory, limits__forward_priority=True)
    key = await make_key(running.url, "k", priority="low")
    before = len(fake.received)
    status, answer = await post(running.url, key, {**CHAT, "priority": bad})
    assert status == 400, answer
    assert answer["error"]["code"] == "invalid_type" and answer["error"]["param"] == "priority"
    assert len(fake.received) == before  # refused before the upstream


async def test_forward_priority_off_leaves_a_clients_priority_alone(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    key = await make_key(running.url, "k", priority="low")
    sent = orjson.dumps({**CHAT, "priority": "not checked: the upstream's to judge"})
    await post(running.url, key, sent)
    assert fake.received[-1].body == sent
