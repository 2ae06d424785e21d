"""The engine's own saturation (`limits.saturation = "metrics"`): the dispatch limit follows the engine's metrics
page so its own first-come queue stays empty and the sidecar's fair order decides; an unreadable page falls back
to `limits.global_concurrency`, says so and adapts again when it returns. The controller's steps, the pages of
vLLM, SGLang and llama-server, and the options' checks. No wall-clock bounds: the engine's queue is sampled and
counted, order is read from what the engine served."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from sidecar.config import ConfigError, LimitsCfg, load
from sidecar.keys.auth import Principal
from sidecar.limits.local import LocalLimits
from sidecar.limits.saturation import PROBE_EVERY, Controller, Reading, parse
from tests.support.engine import Engine
from tests.support.tenants import heavy_load, keyed, new_key, overtaken, owner, send
from tests.support.waits import wait_for

SATURATION = {"limits__global_concurrency": 64, "limits__saturation": "metrics"}


async def figures(url: str) -> dict[str, float]:
    """The sidecar's own series that say how it dispatches: `dispatch_limit`, `state:<s>`, `engine_<x>`."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out = {}
    for name, labels, value in re.findall(r"^sidecar_(dispatch_limit|engine_\w+?)(?:\{([^}]*)\})? (\S+)$", text, re.M):
        state = re.search(r'state="(\w+)"', labels)
        out[f"state:{state.group(1)}" if state else name] = float(value)
    return out


async def readyz(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return r.status, await r.json()


async def settled(engine: Engine, url: str) -> None:
    """The first burst (all 64 slots' worth sent before the first reading) is over: the limit came down and the
    engine's queue drained."""
    limit = 64.0

    async def lowered() -> bool:
        nonlocal limit
        limit = (await figures(url))["dispatch_limit"]
        return limit < 64

    for _ in range(500):
        if await lowered() and engine.waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the dispatch limit stayed {limit}, the engine queues {engine.waiting}")


async def test_the_engines_queue_stays_empty_and_the_fair_order_decides(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, **SATURATION)
    heavy, light = await new_key(running.url, "heavy"), await new_key(running.url, "light")
    stop = asyncio.Event()
    heavy_sent: dict[str, float] = {}
    load = asyncio.create_task(heavy_load(running.url, heavy, "heavy", 24, stop, heavy_sent))
    await settled(engine, running.url)
    began = time.monotonic()
    samples: list[int] = []

    async def sample() -> None:
        while not stop.is_set():
            samples.append(engine.waiting)
            await asyncio.sleep(0.01)

    sampling = asyncio.create_task(sample())
    light_sent = []
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            status, _, sent = await send(s, running.url, light, f"light-{i}")
            assert status == 200
            light_sent.append(sent)
    await wait_for(lambda: len(samples) >= 300, timeout=30)  # and a while more of the heavy load alone
    until = time.monotonic()
    shown = await figures(running.url)
    stop.set()
    await sampling
    assert set(await load) == {200}
    empty = sum(1 for n in samples if n == 0) / len(samples)
    assert empty >= 0.8, (empty, samples)  # without saturation the engine holds ~20 of the heavy key's, always
    passed = overtaken(engine, heavy_sent, light_sent)
    assert min(passed) >= 10, passed  # the light key went ahead of the heavy backlog, held in the sidecar
    assert engine.utilisation(began, until) >= 0.9  # holding dispatch did not starve the engine
    assert 4 <= shown["dispatch_limit"] <= 4 + PROBE_EVERY, shown  # about the engine's capacity, not 64
    assert shown["state:metrics"] == 1 and shown["state:fallback"] == 0 and shown["state:off"] == 0, shown
    assert shown["engine_requests_running"] <= 5 and "engine_kv_cache_usage" in shown, shown
    assert (await readyz(running.url))[1]["saturation"] == "metrics"
    assert sum(1 for r in engine.served if owner(r) == "heavy") > 24


async def test_a_first_burst_waits_in_the_sidecar_not_in_the_engines_queue(engine, sidecar_factory):
    """The slow start: before the engine ever queued, the limit is a few (8) and doubles per reading while the
    engine has room, so a burst of 24 on a fresh sidecar leaves at most what one step sent beyond the engine's
    room in its queue (before: all 20 it could not run)."""
    running = await keyed(engine, sidecar_factory, **SATURATION)
    key = await new_key(running.url, "burst")
    stop = asyncio.Event()
    load = asyncio.create_task(heavy_load(running.url, key, "burst", 24, stop))
    most = 0
    for _ in range(100):  # a second of the burst, sampled
        most = max(most, engine.waiting)
        await asyncio.sleep(0.01)
    stop.set()
    assert set(await load) == {200}
    assert most <= 4, most  # 8 sent, 4 run: 4 wait in the engine at most; the other 16 waited in the sidecar


async def test_an_unreadable_page_falls_back_to_global_concurrency_and_adapts_when_it_returns(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, **SATURATION)
    key = await new_key(running.url, "heavy")
    stop = asyncio.Event()
    load = asyncio.create_task(heavy_load(running.url, key, "heavy", 12, stop))

    def said(text: str) -> int:
        return sum(1 for line in running.catcher.lines if text in line)

    await settled(engine, running.url)
    assert said("engine metrics read") == 1 and said("engine metrics unreadable") == 0
    engine.metrics_down = True
    fetched = engine.metrics_fetches
    await wait_for(lambda: said("engine metrics unreadable") == 1)
    shown = await figures(running.url)
    assert shown["dispatch_limit"] == 64 and shown["state:fallback"] == 1 and shown["state:metrics"] == 0, shown
    assert "engine_requests_waiting" not in shown  # no stale figures
    status, ready = await readyz(running.url)
    assert status == 200 and ready["status"] == "ready" and ready["saturation"] == "fallback", ready
    await wait_for(lambda: engine.waiting > 0)  # the limit is 64 again: the engine queues the heavy key's 12
    await wait_for(lambda: engine.metrics_fetches >= fetched + 8, timeout=10)  # more failed readings...
    assert said("engine metrics unreadable") == 1  # ...one line
    engine.metrics_down = False
    await settled(engine, running.url)
    shown = await figures(running.url)
    assert shown["state:metrics"] == 1 and shown["dispatch_limit"] < 64, shown
    assert (await readyz(running.url))[1]["saturation"] == "metrics"
    assert said("engine metrics read") == 2 and said("engine metrics unreadable") == 1
    stop.set()
    assert set(await load) == {200}


async def test_metrics_upstream_is_served_from_the_pages_the_saturation_reads(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, upstream__metrics_cache=60, **SATURATION)
    key = await new_key(running.url, "k")

    async def page() -> str:
        async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics/upstream") as r:
            assert r.status == 200
            return await r.text()

    assert 'vllm:num_requests_running{engine="0",model_name="engine-model"} 0.0' in await page()
    engine.token_s = 0.2
    async with aiohttp.ClientSession() as s:
        busy = asyncio.create_task(send(s, running.url, key, "k-0"))
        await wait_for(lambda: engine.running == 1)
        fetched = engine.metrics_fetches
        await wait_for(lambda: engine.metrics_fetches >= fetched + 2)  # the saturation read it since
        # A scrape's own cache (60 s) would still hold the idle page: the scrape got the reading's.
        assert 'vllm:num_requests_running{engine="0",model_name="engine-model"} 1.0' in await page()
        assert (await busy)[0] == 200


async def test_off_by_default_the_limit_is_global_concurrency_and_the_page_is_not_read(engine, sidecar_factory):
    running = await keyed(engine, sidecar_factory, limits__global_concurrency=64)
    async with aiohttp.ClientSession() as s:
        key = await new_key(running.url, "k")
        assert (await send(s, running.url, key, "k-0"))[0] == 200
    shown = await figures(running.url)
    assert shown["dispatch_limit"] == 64 and shown["state:off"] == 1, shown
    assert (await readyz(running.url))[1]["saturation"] == "off"
    assert engine.metrics_fetches == 0


def test_the_controller_drops_to_what_the_engine_runs_and_probes_for_room():
    c = Controller(top=64, waiting=0, kv=0.95)
    room = Reading(waiting=0, running=4, kv=0.5)
    assert c.limit == 8  # the engine's room is not known yet: a few
    assert c.step(room, waiters=False) == 8  # nobody waits: nothing to try
    assert [c.step(room, waiters=True) for _ in range(4)] == [16, 32, 64, 64]  # slow start: doubles, up to the top
    assert c.step(Reading(waiting=20, running=4, kv=0.9), waiters=True) == 4  # queued: to what it runs
    assert c.step(Reading(waiting=8, running=4, kv=0.9), waiters=True) == 4  # draining: stays, never below it
    assert [c.step(room, waiters=True) for _ in range(PROBE_EVERY)] == [4] * (PROBE_EVERY - 1) + [5]  # a probe
    assert c.step(Reading(waiting=1, running=4, kv=0.9), waiters=True) == 4  # it queued: back
    probes = [c.step(room, waiters=True) for _ in range(3 * PROBE_EVERY)]
    assert probes[PROBE_EVERY - 1 :: PROBE_EVERY] == [5, 7, 11]  # took without queueing: the stride doubles
    assert c.step(room, waiters=False) == 11  # nobody waits in the sidecar: nothing to learn, it stays
    assert c.step(Reading(waiting=0, running=3, kv=0.97), waiters=True) == 3  # KV full: hold at what runs
    assert c.step(Reading(waiting=0, running=0, kv=0.99), waiters=True) == 1  # never below 1
    assert c.step(None, waiters=True) == 64  # no reading: global_concurrency
    for _ in range(100 * PROBE_EVERY):
        c.step(room, waiters=True)
    assert c.limit == 64  # never above it

    allowed = Controller(top=16, waiting=2, kv=0.95)
    assert allowed.step(Reading(waiting=2, running=4, kv=None), waiters=True) == 16  # two may wait; no KV figure
    assert allowed.step(Reading(waiting=3, running=4, kv=None), waiters=True) == 6  # what runs and two waiting


async def test_a_lowered_limit_holds_the_waiters_until_fewer_are_in_flight():
    local = LocalLimits(LimitsCfg(global_concurrency=4, queue_size=10))
    p = Principal(None, "a", 0, 0, 0)
    running = [await local.acquire(p, 0) for _ in range(4)]
    waiting = [asyncio.create_task(local.acquire(p, 0)) for _ in range(3)]
    await asyncio.sleep(0)
    local.set_limit(2)  # the engine queued: two may run from now on
    running.pop().release()
    running.pop().release()
    await asyncio.sleep(0)
    assert local.global_active == 2 and not any(w.done() for w in waiting)  # the freed slots were not handed on
    running.pop().release()
    await asyncio.sleep(0)
    assert local.global_active == 2 and [w.done() for w in waiting] == [True, False, False]  # below it: the next
    local.set_limit(4)  # room again: the waiters go at once
    await asyncio.sleep(0)
    assert local.global_active == 4 and all(w.done() for w in waiting)
    for lease in [*running, *(w.result() for w in waiting)]:
        lease.release()
    assert local.global_active == 0 and len(local.queue) == 0


def test_the_engines_pages_are_read_by_their_series():
    vllm = (
        b"# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m{1}"} 3.0\nvllm:num_requests_waiting{engine="1"} 2.0\n'
        b'vllm:num_requests_running{engine="0"} 7.0\nvllm:num_requests_running{engine="1"} 9.0\n'
        b'vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:kv_cache_usage_perc{engine="1"} 0.5 1700000000000\n'
        b"vllm:num_requests_waiting_by_reason 99\n"
    )
    assert parse(vllm) == Reading(waiting=5, running=16, kv=0.5)  # summed over engines; KV: the fullest
    old_vllm = b"vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.75\n"
    assert parse(old_vllm) == Reading(1, 2, 0.75)
    sglang = (
        b'sglang:num_running_reqs{model_name="m"} 8\nsglang:num_queue_reqs{model_name="m"} 4\n'
        b'sglang:token_usage{model_name="m"} 0.52\n'
    )
    assert parse(sglang) == Reading(4, 8, 0.52)
    llama = b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 1\n"
    assert parse(llama) == Reading(1, 2, None)  # recent llama-server has no KV figure
    assert parse(b"vllm:num_requests_running 2\n") is None  # no waiting series: not a reading
    assert parse(b"<html>not a metrics page</html>") is None


def test_saturation_options_are_checked():
    with pytest.raises(ConfigError, match="limits.saturation: metrics needs limits.global_concurrency > 0"):
        load(None, {}, {"limits.saturation": "metrics", "limits.global_concurrency": 0})
    with pytest.raises(ConfigError, match="limits.saturation: must be one of off, metrics"):
        load(None, {}, {"limits.saturation": "on"})
    with pytest.raises(ConfigError, match="limits.saturation_interval: must be above 0 and at most 0.25"):
        load(None, {}, {"limits.saturation_interval": 1})
    with pytest.raises(ConfigError, match="limits.saturation_kv: must be above 0 and at most 1"):
        load(None, {}, {"limits.saturation_kv": 95})
    s = load(None, {"SIDECAR_LIMITS_SATURATION": "metrics"}, {})
    assert (s.limits.saturation, s.limits.saturation_interval, s.limits.saturation_waiting) == ("metrics", 0.25, 0)
