"""The Responses API in front of a real llama-server (`/v1/responses` and `/responses`, the `llama.cpp` preset),
whole and streamed: the row's prompt, completion and cached tokens are llama-server's own usage, as the client
got it (the `llama` fixture and its model: tests/support/llama.py, tests/support/real_model.py)."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.support.llama import LlamaServer

pytestmark = pytest.mark.real_upstream
ASK: dict[str, Any] = {
    "model": "tiny",
    "input": "Tell me about the sidecar proxy and its usage records.",
    "max_output_tokens": 16,
    "temperature": 0,
}


@pytest.fixture
async def running(llama: LlamaServer, sidecar_factory: Any) -> Any:
    return await sidecar_factory(llama.url + "/v1", upstream__kind="llama.cpp")


def charged(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["usage_source"]


def reported(usage: dict[str, Any]) -> tuple[Any, ...]:
    return usage["input_tokens"], usage["output_tokens"], usage["input_tokens_details"]["cached_tokens"], "upstream"


def final_event(body: bytes) -> dict[str, Any]:
    """The `response.completed` event of a stream (llama-server sends no `[DONE]`)."""
    events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "response.completed", events[-1]
    return events[-1]


async def test_the_sdk_through_the_sidecar_is_charged_llama_servers_usage(running):
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    try:
        whole = await client.responses.create(**ASK)
        events = [e async for e in await client.responses.create(**ASK, stream=True)]
    finally:
        await client.close()
    assert whole.usage is not None and whole.usage.output_tokens == 16  # the model never ends early
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == whole.output_text  # greedy: the same text, streamed
    rows = await running.stored(2)
    assert [charged(r) for r in rows] == [
        reported(whole.usage.model_dump()),
        reported(final.response.usage.model_dump()),
    ]
    assert rows[1]["cached_tokens"] > 0  # the same prompt again: llama-server reused its cache


@pytest.mark.parametrize("path", ["/v1/responses", "/responses"])
async def test_both_paths_whole_and_streamed(running, path):
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + path, json=ASK) as r:
            assert r.status == 200, await r.text()
            whole = await r.json()
        async with s.post(running.url + path, json={**ASK, "stream": True}) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            streamed = final_event(await r.read())["response"]
    rows = await running.stored(2)
    assert [charged(r) for r in rows] == [reported(whole["usage"]), reported(streamed["usage"])]
    assert rows[0]["completion_tokens"] == 16 and rows[1]["ttft_ms"] is not None
