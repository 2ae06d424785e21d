"""Many keys, one engine: the dispatch queue in front of a fake engine that saturates (`tests/support/engine.py`).
A light key beside a heavy key's backlog, weights 3:1, priority classes with shedding, a client that leaves
while queued; and the key fields that drive it. Order and shares are read from what the engine served, never
from wall-clock bounds."""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp
import orjson
import pytest

from tests.support.clients import admin
from tests.support.tenants import CHAT, heavy_load, keyed, new_key, overtaken, owner, send


@pytest.mark.parametrize("order", ["fair", "fifo"])
async def test_a_light_key_goes_next_beside_a_heavy_keys_backlog(engine, sidecar_factory, order):
    running = await keyed(engine, sidecar_factory, limits__queue_order=order)
    heavy, light = await new_key(running.url, "heavy"), await new_key(running.url, "light")
    stop = asyncio.Event()
    heavy_sent: dict[str, float] = {}
    load = asyncio.create_task(heavy_load(running.url, heavy, "heavy", 24, stop, heavy_sent))
    while sum(1 for r in engine.served if owner(r) == "heavy") < 30:  # the heavy backlog is there
        await asyncio.sleep(0.01)
    light_sent = []
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            status, _, sent = await send(s, running.url, light, f"light-{i}")
            assert status == 200
            light_sent.append(sent)
    stop.set()
    assert set(await load) == {200}
    passed = overtaken(engine, heavy_sent, light_sent)
    if order == "fair":
        assert min(passed) >= 10, passed  # it went ahead of the heavy key's 20 waiting, every time
    else:
        assert max(passed) <= 2, passed  # first come, first served: behind them


async def test_backlogged_keys_share_the_engine_by_weight(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory)
    three, one = await new_key(running.url, "three", weight=3), await new_key(running.url, "one", weight=1)
    stop = asyncio.Event()
    loads = [
        asyncio.create_task(heavy_load(running.url, three, "three", 12, stop)),
        asyncio.create_task(heavy_load(running.url, one, "one", 12, stop)),
    ]
    await asyncio.sleep(0.5)  # both backlogged
    began = time.monotonic()
    await asyncio.sleep(3.0)
    until = time.monotonic()
    stop.set()
    for load in loads:
        assert set(await load) == {200}
    served = collections.Counter(owner(r) for r in engine.served if began <= r.started < until)
    share = served["three"] / (served["three"] + served["one"])
    assert abs(share - 0.75) <= 0.075, served  # within 10% of the weights' 3:1
    assert engine.utilisation(began, until) >= 0.9  # the engine was kept busy while the sidecar chose


async def test_priorities_go_first_and_low_is_shed_first(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, limits__global_concurrency=1, limits__queue_size=3)
    engine.token_s = 0.05
    low = await new_key(running.url, "low", priority="low")
    high = await new_key(running.url, "high", priority="high")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        first = asyncio.create_task(send(s, running.url, low, "low-running"))
        while not engine.served:
            await asyncio.sleep(0.005)
        waiting = []
        for i in range(3):  # the queue is full of low requests
            waiting.append(asyncio.create_task(send(s, running.url, low, f"low-{i}")))
            await asyncio.sleep(0.05)
        refused = await send(s, running.url, low, "low-refused")  # a low newcomer: refused at once
        assert refused[0] == 503 and refused[1]["x-sidecar-limit"] == "queue_full"
        assert orjson.loads(refused[1]["body"])["error"]["code"] == "queue_full"
        high_done = asyncio.create_task(send(s, running.url, high, "high"))
        shed = await waiting[-1]  # the newest low waiter gave its place to the high request
        assert shed[0] == 503 and shed[1]["x-sidecar-limit"] == "queue_shed" and shed[1]["retry-after"] == "1"
        assert (await high_done)[0] == 200 and (await first)[0] == 200
        assert [(await w)[0] for w in waiting[:2]] == [200, 200]
    order = [r.user for r in engine.served]
    assert order == ["low-running", "high", "low-0", "low-1"], order  # high went before the lows that waited
    rows = await running.stored(7)
    assert collections.Counter((r["status"], r["error_code"]) for r in rows)[(503, "queue_shed")] == 1


async def test_a_client_that_leaves_while_queued_frees_its_place_at_once(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, limits__global_concurrency=1)
    engine.token_s = 0.05
    key = await new_key(running.url, "k")
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(send(s, running.url, key, "first"))
        while not engine.served:
            await asyncio.sleep(0.005)
        _reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        body = orjson.dumps({**CHAT, "user": "left", "stream": True})
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        async with s.get(running.url + "/metrics") as r:
            assert 'sidecar_lease_queue_depth{priority="normal"} 1.0' in await r.text()
        writer.close()  # leaves while queued
        await asyncio.sleep(0.1)
        async with s.get(running.url + "/metrics") as r:
            assert 'sidecar_lease_queue_depth{priority="normal"} 0.0' in await r.text()
        assert (await first)[0] == 200
    assert [r.user for r in engine.served] == ["first"]  # the engine never saw the one that left
    rows = await running.stored(2)
    left = [r for r in rows if r["stream"]]
    assert [(r["status"], r["outcome"]) for r in left] == [(499, "client_disconnected")]


async def test_weight_priority_and_cache_group_are_key_fields(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory)
    async with aiohttp.ClientSession() as s:
        url = running.url + "/admin/keys"
        for bad in ({"weight": 0}, {"weight": -1}, {"weight": "3"}, {"weight": 1e6}, {"priority": "urgent"},
                    {"cache_group": ""}, {"cache_group": "a\x00b"}):  # fmt: skip
            status, body, _ = await admin(s, "POST", url, {"name": "x", **bad})
            assert status == 400 and body["error"]["param"] == next(iter(bad)), (bad, body)
        status, made, _ = await admin(s, "POST", url, {"name": "x", "weight": 2.5, "priority": "high"})
        assert status == 201 and (made["weight"], made["priority"], made["cache_group"]) == (2.5, "high", None)
        status, changed, _ = await admin(s, "PATCH", f"{url}/{made['id']}", {"priority": "low", "cache_group": "t"})
        assert status == 200 and (changed["priority"], changed["cache_group"], changed["weight"]) == ("low", "t", 2.5)
        _, log, _ = await admin(s, "GET", running.url + "/admin/audit")
        assert {"priority": "low", "cache_group": "t"} in [e["changes"] for e in log["data"]]
