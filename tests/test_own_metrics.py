"""The sidecar's own cost and the metrics people build on (#18): the overhead histogram and header, the
upstream's page relayed (and cached) on the ops port, `model` labels bounded by the upstream's list, the standard
process and Python series, time to first token only where tokens are generated."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def chat(url: str, body: dict | None = None) -> aiohttp.typedefs.LooseHeaders:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=body or CHAT) as r:
        assert r.status == 200
        await r.read()
        return r.headers


def value(text: str, series: str) -> float | None:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


async def test_the_overhead_histogram_counts_every_proxied_request_and_the_header_is_opt_in(fake, sidecar_factory):
    plain = await sidecar_factory(fake.url)
    assert "x-sidecar-overhead-ms" not in await chat(plain.url)
    running = await sidecar_factory(fake.url, server__overhead_header=True)
    fake.script.delay_headers = 0.3  # upstream time: never in the sidecar's own
    headers = [await chat(running.url), await chat(running.url, {**CHAT, "stream": True})]
    own = [float(h["x-sidecar-overhead-ms"]) for h in headers]
    assert all(0 < ms < 300 for ms in own), own
    _, text = await get_text(running.url + "/metrics")
    route = 'route="/v1/chat/completions"'
    assert value(text, f"sidecar_overhead_seconds_count{{{route}}}") == 2
    assert value(text, f"sidecar_lease_wait_seconds_count{{{route}}}") == 2
    total = value(text, f"sidecar_overhead_seconds_sum{{{route}}}")
    assert total is not None and 0 < total < 0.3  # 2 x 0.3 s of upstream time are not in it


async def test_a_slow_upload_is_the_clients_time_not_the_sidecars(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__overhead_header=True)
    body = json.dumps(CHAT).encode()

    async def slowly():
        yield body[:10]
        await asyncio.sleep(0.5)
        yield body[10:]

    async with aiohttp.ClientSession() as s:
        headers = {"content-type": "application/json"}
        async with s.post(running.url + "/v1/chat/completions", data=slowly(), headers=headers) as r:
            assert r.status == 200
            own = float(r.headers["x-sidecar-overhead-ms"])
    assert own < 300, own
    _, text = await get_text(running.url + "/metrics")
    assert value(text, 'sidecar_overhead_seconds_sum{route="/v1/chat/completions"}') < 0.3


async def test_the_upstreams_page_is_relayed_cached_and_shared(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(fake.url, upstream__metrics_cache=0.5)
    statuses = await asyncio.gather(*(get_text(running.url + "/metrics/upstream") for _ in range(10)))
    assert [s for s, _ in statuses] == [200] * 10
    assert "vllm:num_requests_waiting" in statuses[0][1]
    assert fake.metrics_fetches == 1  # ten scrapes at once: one fetch
    await get_text(running.url + "/metrics/upstream")
    assert fake.metrics_fetches == 1  # within the cache time
    await asyncio.sleep(0.6)
    await get_text(running.url + "/metrics/upstream")
    assert fake.metrics_fetches == 2


async def test_the_upstreams_page_when_the_upstream_is_down_is_a_502(sidecar_factory):
    running = await sidecar_factory("http://127.0.0.1:9/v1", upstream__connect_timeout=0.5)
    status, text = await get_text(running.url + "/metrics/upstream")
    assert status == 502 and "unavailable" in text


async def test_model_labels_are_what_the_upstream_lists_and_the_standard_series_are_there(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    await get_text(running.url + "/metrics")  # a scrape asks the upstream for its models
    await chat(running.url)
    await chat(running.url, {**CHAT, "model": "anything-a-client-says"})
    async with aiohttp.ClientSession() as s, s.get(running.url + "/v1/models") as r:
        assert r.status == 200
    _, text = await get_text(running.url + "/metrics")
    assert value(text, 'sidecar_tokens_total{kind="prompt",model="fake-model"}') == 11
    assert value(text, 'sidecar_tokens_total{kind="prompt",model="other"}') == 11
    assert "anything-a-client-says" not in text
    assert value(text, 'sidecar_key_tokens_total{key_id="none",kind="completion"}') == 10
    assert value(text, "process_cpu_seconds_total") is not None and "python_info{" in text
    assert 'sidecar_time_to_first_token_seconds_count{route="/v1/chat/completions"} 2' in text
    assert 'sidecar_time_to_first_token_seconds_count{route="/v1/models"}' not in text  # nothing generated there
    assert 'sidecar_request_duration_seconds_count{route="/v1/models"} 1' in text
