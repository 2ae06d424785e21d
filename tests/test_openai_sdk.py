"""The official openai SDK gives the same results through the sidecar as straight to the upstream."""

from __future__ import annotations

from typing import Any

import openai
import pytest

MESSAGES: Any = [{"role": "user", "content": "hello"}]


OPEN: list[openai.AsyncOpenAI] = []


def clients(fake: Any, sidecar: Any) -> tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]:
    direct = openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0)
    proxied = openai.AsyncOpenAI(base_url=sidecar.url + "/v1", api_key="k", max_retries=0)
    OPEN.extend((direct, proxied))
    return direct, proxied


@pytest.fixture(autouse=True)
async def close_clients():
    yield
    while OPEN:
        await OPEN.pop().close()


async def test_chat_non_streaming(fake, sidecar):
    direct, proxied = clients(fake, sidecar)
    a = await direct.chat.completions.create(model="m", messages=MESSAGES)
    b = await proxied.chat.completions.create(model="m", messages=MESSAGES)
    assert a.model_dump() == b.model_dump()
    assert b.usage is not None and b.usage.completion_tokens == 5


async def test_chat_streaming(fake, sidecar):
    direct, proxied = clients(fake, sidecar)
    for options in (None, {"include_usage": True}):
        kwargs: Any = {"stream_options": options} if options else {}
        a = [
            c.model_dump()
            async for c in await direct.chat.completions.create(model="m", messages=MESSAGES, stream=True, **kwargs)
        ]
        b = [
            c.model_dump()
            async for c in await proxied.chat.completions.create(model="m", messages=MESSAGES, stream=True, **kwargs)
        ]
        assert a == b
        assert len(b) == 7 + (1 if options else 0)


async def test_completions(fake, sidecar):
    direct, proxied = clients(fake, sidecar)
    a = await direct.completions.create(model="m", prompt="once upon")
    b = await proxied.completions.create(model="m", prompt="once upon")
    assert a.model_dump() == b.model_dump()
    sa = [c.model_dump() async for c in await direct.completions.create(model="m", prompt="x", stream=True)]
    sb = [c.model_dump() async for c in await proxied.completions.create(model="m", prompt="x", stream=True)]
    assert sa == sb


async def test_embeddings(fake, sidecar):
    direct, proxied = clients(fake, sidecar)
    a = await direct.embeddings.create(model="m", input=["a", "b"], encoding_format="float")
    b = await proxied.embeddings.create(model="m", input=["a", "b"], encoding_format="float")
    assert a.model_dump() == b.model_dump()
    assert sidecar.rows[-1]["prompt_tokens"] == 6


async def test_models(fake, sidecar):
    direct, proxied = clients(fake, sidecar)
    a = [m.model_dump() async for m in direct.models.list()]
    b = [m.model_dump() async for m in proxied.models.list()]
    assert a == b and b[0]["id"] == "fake-model"


async def test_sdk_sees_openai_shaped_errors(sidecar_factory):
    from tests.support.waits import free_port

    running = await sidecar_factory(f"http://127.0.0.1:{free_port()}/v1")
    client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="k", max_retries=0)
    OPEN.append(client)
    try:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    except openai.APIStatusError as exc:
        assert exc.status_code == 502
        assert exc.body["code"] == "upstream_unreachable"  # type: ignore[index]
    else:
        raise AssertionError("expected a 502")
