"""What a request is charged: never below what its body proves (token-id prompts, nested tool schemas), also
when the client hangs up; and an error that arrives as a stream is recorded as an error."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.wire.tokens import estimate_prompt
from tests.support.bodies import CHAT
from tests.support.fake_upstream import Script


def test_token_id_prompts_count_one_token_per_id():
    assert estimate_prompt({"prompt": list(range(5000))}) >= 5000
    assert estimate_prompt({"prompt": [list(range(300)), list(range(200))]}) >= 500
    assert estimate_prompt({"input": [[1, 2], [3]]}) >= 3


def test_nested_tool_schemas_count_at_any_depth():
    schema: dict = {"description": "x" * 3000}
    for name in "abcdefghijkl":  # twelve levels deep: the old estimate stopped at eight
        schema = {"type": "object", "properties": {name: schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert estimate_prompt({**CHAT, "tools": tools}) >= 1000


async def _hang_up_after(port: int, path: str, body: dict, marker: bytes | None) -> None:
    """Send a request, read until `marker` (None: nothing at all), then reset the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    seen = b""
    while marker is not None and marker not in seen:
        seen += await asyncio.wait_for(reader.read(65536), 10)
    await asyncio.sleep(0.05 if marker is None else 0)
    writer.transport.abort()


async def test_a_token_id_prompt_dropped_after_the_first_event_is_charged_its_prompt(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    fake.script = Script(chunks=200, delay_chunks=0.02, usage=False)
    body = {"model": "m", "prompt": list(range(5000)), "stream": True, "max_tokens": 300}
    await _hang_up_after(running.port, "/v1/completions", body, b"tok0")
    (row,) = await running.stored(1)
    assert row["outcome"] == "client_disconnected" and row["usage_source"] == "counted"
    assert row["prompt_tokens"] >= 5000, row


async def test_a_client_gone_before_the_first_byte_is_charged_its_prompt(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    fake.script = Script(delay_headers=2.0)
    body = {"model": "m", "messages": [{"role": "user", "content": "word " * 3000}]}
    await _hang_up_after(running.port, "/v1/chat/completions", body, None)
    (row,) = await running.stored(1)
    assert row["outcome"] == "client_disconnected" and row["usage_source"] == "counted"
    assert row["prompt_tokens"] >= 5000 and row["completion_tokens"] == 0


async def test_a_client_rejected_before_the_upstream_is_charged_nothing(fake, sidecar_factory):
    running = await sidecar_factory(fake.url)
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "max_tokens": "x"}) as r:
            assert r.status == 400
    (row,) = await running.stored(1)
    assert row["prompt_tokens"] is None and row["usage_source"] == "none"


async def test_an_error_status_streamed_as_sse_is_an_upstream_error(sidecar_factory):
    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=503, headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"error": {"message": "overloaded"}}\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", failing)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{server.port}/v1")
        async with aiohttp.ClientSession() as s:
            async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 503 and b"overloaded" in await r.read()
        (row,) = await running.stored(1)
        assert (row["outcome"], row["status"], row["upstream_status"]) == ("upstream_error", 503, 503)
    finally:
        await server.close()


def _big_answer(usage_first: bool) -> bytes:
    """A 1.6 MB chat answer; with `usage_first` its usage object comes before 1.5 MB of prompt_logprobs (vLLM's
    order), far from both ends."""
    logprobs = orjson.dumps([{"7": {"logprob": -1.5, "rank": 1, "decoded_token": "x"}}] * 30_000)
    usage = b'"usage":{"prompt_tokens":30000,"completion_tokens":9,"total_tokens":30009}'
    head = b'{"id":"c","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant",'
    head += b'"content":"' + b"w" * 100_000 + b'"},"finish_reason":"stop"}],'
    if usage_first:
        return head + usage + b',"prompt_logprobs":' + logprobs + b"}"
    return head + b'"prompt_logprobs":' + logprobs + b"," + usage + b"}"


async def _serve(body: bytes, delay_each: float = 0.0):
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        for at in range(0, len(body), 65536):
            await resp.write(body[at : at + 65536])
            if delay_each:
                await asyncio.sleep(delay_each)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize("usage_first", [True, False], ids=["usage-then-logprobs", "usage-last"])
async def test_usage_is_found_anywhere_in_a_large_relayed_answer(sidecar_factory, usage_first):
    server = await _serve(_big_answer(usage_first))
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{server.port}/v1")
        async with aiohttp.ClientSession() as s:
            async with s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200 and len(await r.read()) > 1_500_000
        (row,) = await running.stored(1)
        assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (30000, 9, "upstream")
    finally:
        await server.close()


async def test_a_client_gone_in_the_middle_of_a_large_answer_is_charged_its_reservation(sidecar_factory):
    server = await _serve(_big_answer(False), delay_each=0.01)
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{server.port}/v1")
        await _hang_up_after(running.port, "/v1/chat/completions", {**CHAT, "max_tokens": 700}, b"wwwwwwww")
        (row,) = await running.stored(1)
        assert row["outcome"] == "client_disconnected" and row["usage_source"] == "counted"
        assert row["completion_tokens"] == 700 and row["prompt_tokens"] >= 1
    finally:
        await server.close()
