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


def usage_row(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"))


async def test_responses_with_their_usage_details(fake, sidecar):
    """`client.responses.create`, whole and streamed: the same answer and events as straight to the upstream, the
    usage details unchanged, and the row equal to them."""
    fake.script.cached_tokens, fake.script.reasoning_chunks = 4, 3
    direct, proxied = clients(fake, sidecar)
    a = await direct.responses.create(model="m", input="hello")
    b = await proxied.responses.create(model="m", input="hello")
    assert a.model_dump() == b.model_dump() and b.output_text == "tok0 tok1 tok2 tok3 tok4 "
    assert b.usage is not None and b.usage.input_tokens_details.cached_tokens == 4
    assert b.usage.output_tokens_details.reasoning_tokens == 3
    sa = [e.model_dump() async for e in await direct.responses.create(model="m", input="hello", stream=True)]
    sb = [e.model_dump() async for e in await proxied.responses.create(model="m", input="hello", stream=True)]
    assert sa == sb and sb[-1]["type"] == "response.completed"
    assert sb[-1]["response"]["usage"] == b.usage.model_dump()
    rows = await sidecar.stored(2)
    assert [usage_row(r) for r in rows] == [(11, 8, 4, 3), (11, 8, 4, 3)]


async def test_chat_usage_details_arrive_unchanged(fake, sidecar):
    fake.script.cached_tokens, fake.script.reasoning_tokens = 6, 2
    _, proxied = clients(fake, sidecar)
    whole = await proxied.chat.completions.create(model="m", messages=MESSAGES)
    stream = await proxied.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    last = [c async for c in stream][-1]
    for usage in (whole.usage, last.usage):
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.completion_tokens_details is not None
        assert (usage.prompt_tokens_details.cached_tokens, usage.completion_tokens_details.reasoning_tokens) == (6, 2)
    rows = await sidecar.stored(2)
    assert [usage_row(r) for r in rows] == [(11, 5, 6, 2), (11, 5, 6, 2)]


async def test_the_demo_upstream_answers_the_responses_api_through_the_sidecar(sidecar_factory):
    """`bash scripts/dev.sh serve` puts the bundled demo upstream behind the sidecar: the SDK's Responses API works
    there too, whole and streamed, and each row has the demo's usage."""
    from aiohttp.test_utils import TestServer

    from sidecar.demo_upstream import create_demo_app

    server = TestServer(create_demo_app(), host="127.0.0.1")
    await server.start_server()
    try:
        running = await sidecar_factory(str(server.make_url("/v1")))
        client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="k", max_retries=0)
        OPEN.append(client)
        whole = await client.responses.create(model="demo", input="hello there friend")
        assert whole.output_text == "You said: hello there friend" and whole.usage.output_tokens == 5
        events = [e async for e in await client.responses.create(model="demo", input="hi you", stream=True)]
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "You said: hi you"
        assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == 4
        rows = await running.stored(2)
        assert [(r["prompt_tokens"], r["completion_tokens"], r["usage_source"]) for r in rows] == [
            (3, 5, "upstream"),
            (2, 4, "upstream"),
        ]
    finally:
        await server.close()
