"""/healthz, /readyz and /metrics."""

from __future__ import annotations

import aiohttp
import orjson

from tests.support.waits import free_port


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert "x-request-id" in r.headers
        return r.status, await r.text()


async def test_healthz_never_calls_upstream(fake, sidecar):
    assert (await get(sidecar.url + "/healthz"))[0] == 200
    assert fake.received == []


async def test_healthz_ok_even_with_upstream_down(sidecar_factory):
    running = await sidecar_factory(f"http://127.0.0.1:{free_port()}/v1")
    assert (await get(running.url + "/healthz"))[0] == 200
    status, body = await get(running.url + "/readyz")
    assert status == 503 and orjson.loads(body)["reason"] == "upstream"  # the why is in the log, not the body
    assert "unreachable" not in body and "upstream unreachable" in running.log_text()


async def test_readyz_follows_upstream_health_and_draining(fake, sidecar):
    assert (await get(sidecar.url + "/readyz"))[0] == 200
    fake.script.status = 503
    assert (await get(sidecar.url + "/readyz"))[0] == 503
    fake.script.status = 200
    from sidecar.app import STATE

    sidecar.server.app[STATE].draining = True
    status, body = await get(sidecar.url + "/readyz")
    assert status == 503 and "draining" in body


async def test_metrics_exposition(fake, sidecar):
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sidecar.url + "/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"authorization": "Bearer sk-canary-metrics"},
        ) as r:
            await r.read()
        async with s.post(sidecar.url + "/v1/nope/" + "x" * 50) as r:
            await r.read()
    status, text = await get(sidecar.url + "/metrics")
    assert status == 200
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    # Ours, and the standard process and Python series (issue #18); nothing else.
    assert all(n.startswith(("sidecar_", "process_", "python_")) for n in names), names
    assert "process_resident_memory_bytes" in names and "python_info" in names
    assert not any(n.endswith("_created") for n in names)
    assert 'sidecar_requests_total{code="200",outcome="completed",route="/v1/chat/completions"} 1.0' in text
    assert 'sidecar_requests_total{code="404",outcome="bad_request",route="other"} 1.0' in text
    assert "sidecar_build_info{" in text and "sidecar_in_flight_requests 0.0" in text
    assert "sidecar_time_to_first_token_seconds_bucket" in text
    assert "canary" not in text and "xxxxx" not in text
