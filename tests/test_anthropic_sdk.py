"""Anthropic's own Python SDK through the sidecar: the key sent as the SDK sends it (`x-api-key`), messages
created whole and streamed with the usage object unchanged (cache figures included) and the row equal to it,
count_tokens, and the sidecar's refusals raised as the SDK's own errors."""

from __future__ import annotations

import aiohttp
import anthropic
import httpx
import pytest

from tests.support.clients import ADMIN, admin

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__kind="vllm", auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        _, made, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "sdk", "rpm": 4})
    async with httpx.AsyncClient() as http:
        # 0.38 builds its own httpx client with an argument newer httpx dropped: hand it one
        sdk = anthropic.AsyncAnthropic(base_url=running.url, api_key=made["key"], max_retries=0, http_client=http)
        yield running, sdk


def usage_row(row):
    return (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["cache_write_tokens"])


async def test_a_whole_message_and_its_usage(fake, client):
    running, sdk = client
    message = await sdk.messages.create(model="fake-model", max_tokens=64, messages=MESSAGES)
    assert message.type == "message" and message.content[0].text.startswith("tok0 ")
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (4, 5)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3, 4)
    assert "x-api-key" not in fake.last().headers and fake.last().headers["anthropic-version"]
    (row,) = await running.stored(1)
    assert usage_row(row) == (4 + 3 + 4, 5, 3, 4) and row["usage_source"] == "upstream"


async def test_a_streamed_message_and_its_usage(fake, client):
    running, sdk = client
    fake.script.thinking = 2
    async with sdk.messages.stream(model="fake-model", max_tokens=64, messages=MESSAGES) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(f"tok{i} " for i in range(5))
    usage = final.usage  # the SDK merged message_start's and message_delta's, as the sidecar did
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens) == (4, 7, 3)
    (row,) = await running.stored(1)
    assert usage_row(row) == (11, 7, 3, 4) and row["stream"]


async def test_count_tokens(fake, client):
    running, sdk = client
    counted = await sdk.beta.messages.count_tokens(model="fake-model", messages=MESSAGES)  # GA after 0.38
    assert counted.input_tokens == 12
    (row,) = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (12, 0)


async def test_refusals_are_the_sdk_s_errors(fake, client):
    running, sdk = client
    async with httpx.AsyncClient() as http:
        wrong = anthropic.AsyncAnthropic(base_url=running.url, api_key="sk-wrong", max_retries=0, http_client=http)
        with pytest.raises(anthropic.AuthenticationError) as raised:
            await wrong.messages.create(model="fake-model", max_tokens=8, messages=MESSAGES)
    assert raised.value.body["type"] == "error" and raised.value.body["error"]["type"] == "authentication_error"
    for _ in range(4):  # the key's rpm
        await sdk.messages.create(model="fake-model", max_tokens=8, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as limited:
        await sdk.messages.create(model="fake-model", max_tokens=8, messages=MESSAGES)
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["retry-after"]) >= 1
