"""What an operator sees of the dispatch queue (#29) in front of a fake engine that saturates
(`tests/support/engine.py`): refusals counted by which limit of the queue said no, the wait per priority class,
and the console's view of the queue (depth per class, per key what waits and runs, each key's share of the
tokens served)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.support.clients import ADMIN, admin
from tests.support.waits import wait_for

CHAT = {"model": "engine-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


async def new_key(url: str, name: str, **fields) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s:
        status, created, _ = await admin(s, "POST", url + "/admin/keys", {"name": name, **fields})
    assert status == 201, created
    return created["key"], created["id"]


async def send(s: aiohttp.ClientSession, url: str, key: str, user: str) -> tuple[int, str]:
    async with s.post(
        url + "/v1/chat/completions", json={**CHAT, "user": user}, headers={"authorization": f"Bearer {key}"}
    ) as r:
        await r.read()
        return r.status, r.headers.get("x-sidecar-limit", "")


def samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric's samples on a /metrics page."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


async def test_queue_refusals_count_by_reason_and_the_wait_by_class(engine, sidecar_factory):
    running = await sidecar_factory(
        engine.url, auth__enabled=True, server__admin_token=ADMIN, limits__global_concurrency=1,
        limits__queue_size=2, limits__queue_timeout=0.3,
    )  # fmt: skip
    engine.token_s = 0.1  # the first request runs ~1 s: everything queued behind it times out
    low, _ = await new_key(running.url, "low", priority="low")
    high, _ = await new_key(running.url, "high", priority="high")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        first = asyncio.create_task(send(s, running.url, low, "low-running"))
        await wait_for(lambda: len(engine.served) == 1)
        waiting = [asyncio.create_task(send(s, running.url, low, f"low-{i}")) for i in range(2)]
        await asyncio.sleep(0.05)  # both queued: the queue is full
        assert await send(s, running.url, low, "low-refused") == (503, "queue_full")
        high_one = asyncio.create_task(send(s, running.url, high, "high"))  # pushes the newest low waiter out
        outcomes = sorted([await w for w in waiting])
        assert outcomes == [(503, "queue_shed"), (503, "queue_timeout")], outcomes
        assert await high_one == (503, "queue_timeout")
        assert (await first)[0] == 200
        async with s.get(running.url + "/metrics") as r:
            page = await r.text()
    refused = samples(page, "sidecar_rate_limited_total")
    assert refused['reason="queue_full"'] == 1 and refused['reason="queue_shed"'] == 1, refused
    assert refused['reason="queue_timeout"'] == 2 and refused['reason="overloaded"'] == 0, refused
    counts = samples(page, "sidecar_queue_wait_seconds_count")
    # low: the one dispatched at once, the one shed, the one timed out (the refused newcomer never waited)
    assert counts == {'priority="high"': 1, 'priority="normal"': 0, 'priority="low"': 3}, counts
    buckets = samples(page, "sidecar_queue_wait_seconds_bucket")
    assert buckets['le="0.001",priority="low"'] == 1  # dispatched at once: no wait
    assert buckets['le="0.25",priority="high"'] == 0 and buckets['le="+Inf",priority="high"'] == 1  # waited 0.3 s
    assert samples(page, "sidecar_queue_wait_seconds_sum")['priority="high"'] >= 0.29


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def signed_in(s: aiohttp.ClientSession, url: str, token: str) -> None:
    async with s.post(url + "/console/api/session", json={"token": token}) as r:
        assert r.status == 200


async def test_the_console_shows_the_queue_and_each_keys_share(engine, sidecar_factory):
    running = await sidecar_factory(
        engine.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True,
        limits__global_concurrency=2, limits__queue_size=50,
    )  # fmt: skip
    engine.token_s = 0.2  # requests run ~2 s while the queue is looked at, then are sped up
    (heavy, heavy_id), (light, light_id) = await new_key(running.url, "heavy"), await new_key(running.url, "light")
    async with browser() as s, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as load:
        await signed_in(s, running.url, ADMIN)
        sent = [asyncio.create_task(send(load, running.url, heavy, f"heavy-{i}")) for i in range(6)]
        await wait_for(lambda: engine.running == 2)
        await asyncio.sleep(0.1)  # the other four heavy ones queued
        sent.append(asyncio.create_task(send(load, running.url, light, "light")))

        async def view() -> dict:
            async with s.get(running.url + "/console/api/queue") as r:
                assert r.status == 200 and r.headers["content-security-policy"]
                return await r.json()

        queue = await view()
        for _ in range(100):
            if queue["depth"]["normal"] == 5:
                break
            await asyncio.sleep(0.02)
            queue = await view()
        assert queue["depth"] == {"high": 0, "normal": 5, "low": 0}, queue
        assert (queue["order"], queue["limit"], queue["active"], queue["size"]) == ("fair", 2, 2, 50)
        rows = {row["key_id"]: row for row in queue["data"]}
        assert rows[heavy_id]["waiting"] == {"high": 0, "normal": 4, "low": 0} and rows[heavy_id]["in_flight"] == 2
        assert rows[light_id]["waiting"] == {"high": 0, "normal": 1, "low": 0} and rows[light_id]["in_flight"] == 0
        assert queue["data"][0]["key_id"] == heavy_id  # the busiest first
        engine.token_s = 0.001
        assert {status for status, _ in await asyncio.gather(*sent)} == {200}
        queue = await view()
        assert queue["depth"] == {"high": 0, "normal": 0, "low": 0} and queue["active"] == 0
        rows = {row["key_id"]: row for row in queue["data"]}
        for key_id, name in ((heavy_id, "heavy"), (light_id, "light")):  # what the engine said it served
            tokens = sum(r.tokens for r in engine.served if (r.user or "").startswith(name))
            assert rows[key_id]["served_tokens"] == tokens and rows[key_id]["in_flight"] == 0
        assert queue["served_tokens"] == sum(r.tokens for r in engine.served)
        assert rows[heavy_id]["share"] == pytest.approx(6 / 7, abs=0.001)  # same-sized requests: 6 of 7
        async with s.get(running.url + "/console/api/queue?top=1") as r:
            assert r.status == 200 and [row["key_id"] for row in (await r.json())["data"]] == [heavy_id]
        for bad in ("top=0", "top=x", "top=51", "other=1"):
            async with s.get(running.url + "/console/api/queue?" + bad) as r:
                assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error", bad
    async with browser() as holder:  # a key holder: not theirs to see
        await signed_in(holder, running.url, light)
        async with holder.get(running.url + "/console/api/queue") as r:
            assert r.status == 403
    async with aiohttp.ClientSession() as nobody, nobody.get(running.url + "/console/api/queue") as r:
        assert r.status == 401
