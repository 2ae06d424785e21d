"""Anthropic's Messages API through the `llama.cpp` preset to a real llama-server: whole, streamed and
count_tokens, each row equal to llama-server's own usage (prompt = input_tokens + cache_read_input_tokens)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.wire.sse import StreamScanner
from tests.support.llama import LlamaServer

pytestmark = pytest.mark.real_upstream

ASK: Any = {
    "model": "tiny",
    "max_tokens": 12,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Tell me about the sidecar proxy and its usage records."}],
}


@pytest.fixture
async def proxied(llama: LlamaServer, sidecar_factory: Any) -> Any:
    return await sidecar_factory(llama.url, upstream__kind="llama.cpp")


def prompt_of(usage: dict[str, Any]) -> int:
    return int(usage["input_tokens"]) + int(usage.get("cache_read_input_tokens") or 0)


async def test_a_whole_message_is_charged_llama_server_s_usage(proxied):
    async with aiohttp.ClientSession() as s, s.post(proxied.url + "/v1/messages", json=ASK) as r:
        assert r.status == 200
        message = await r.json()
    assert message["type"] == "message" and message["usage"]["output_tokens"] == 12
    [row] = await proxied.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_of(message["usage"]), 12)
    assert row["cached_tokens"] == message["usage"]["cache_read_input_tokens"]


async def test_a_streamed_message_is_charged_llama_server_s_usage(proxied):
    async with aiohttp.ClientSession() as s, s.post(proxied.url + "/v1/messages", json={**ASK, "stream": True}) as r:
        assert r.status == 200
        body = await r.read()
    events = [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start, delta = events[0]["message"]["usage"], events[-2]["usage"]
    assert delta["output_tokens"] == 12
    [row] = await proxied.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (prompt_of(start), 12, "upstream")
    scanner = StreamScanner(family="messages")  # what was relayed counts one delta per token
    scanner.feed(body)
    assert scanner.deltas == sum(1 for e in events if e["type"] == "content_block_delta") == 12


async def test_count_tokens_is_charged_llama_server_s_count(proxied, llama):
    async with aiohttp.ClientSession() as s:
        async with s.post(proxied.url + "/v1/messages/count_tokens", json=ASK) as r:
            assert r.status == 200
            counted = await r.json()
        async with s.post(llama.url + "/v1/messages/count_tokens", json=ASK) as r:
            assert await r.json() == counted  # the server's own answer, relayed unchanged
    [row] = await proxied.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (counted["input_tokens"], 0)
