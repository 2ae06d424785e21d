"""The sidecar in front of a real model server: llama.cpp's llama-server with a tiny random-weight model.

Built by `bash scripts/real-upstream.sh build` into a cache outside the repo; these tests skip when it is not
there (and fail when SIDECAR_REAL_UPSTREAM=required, as .ci/run sets after building it). The official openai
SDK talks to the sidecar; the numbers are compared with llama-server's own, asked directly.

The model's greedy completions never end early (see tests/support/real_model.py), so `completion_tokens == max_tokens`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.support.llama_server import LlamaServer, llama_server  # noqa: F401  (the `llama` fixture)

pytestmark = pytest.mark.real_upstream
MESSAGES: Any = [{"role": "user", "content": "Tell me about the sidecar proxy and its usage records."}]


@pytest.fixture
async def sdk(llama: LlamaServer, sidecar_factory: Any) -> Any:
    running = await sidecar_factory(llama.url + "/v1")
    proxied = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=llama.url + "/v1", api_key="unused", max_retries=0)
    yield running, proxied, direct
    await proxied.close()
    await direct.close()


def ask(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, **extra}


async def test_non_streaming_usage_is_the_servers_own(sdk):
    running, proxied, direct = sdk
    got = await proxied.chat.completions.create(**ask(24))
    ref = await direct.chat.completions.create(**ask(24))
    assert got.choices[0].message.content == ref.choices[0].message.content  # greedy: the same completion
    assert got.usage.completion_tokens == ref.usage.completion_tokens == 24
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens
    [row] = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (got.usage.prompt_tokens, 24)
    assert row["usage_source"] == "upstream"
    assert row["outcome"] == "completed"


async def test_stream_without_include_usage_hides_the_usage_chunk_and_records_it(sdk):
    running, proxied, direct = sdk
    chunks = [c async for c in await proxied.chat.completions.create(**ask(20, stream=True))]
    assert all(c.usage is None for c in chunks), "the usage chunk the client did not ask for leaked"
    # llama-server puts its `timings` on the chunk that carries the usage: that chunk reaches the client
    # without `usage`, so the timings are not lost (README: differences through the sidecar).
    *content, last = chunks
    assert all(c.choices for c in content)
    assert last.choices == [] and last.model_extra.get("timings", {}).get("predicted_n") == 20
    text = "".join(c.choices[0].delta.content or "" for c in content)
    ref_chunks = [
        c
        async for c in await direct.chat.completions.create(
            **ask(20, stream=True, stream_options={"include_usage": True})
        )
    ]
    ref_usage = ref_chunks[-1].usage
    assert text == "".join(c.choices[0].delta.content or "" for c in ref_chunks if c.choices)
    [row] = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (ref_usage.prompt_tokens, ref_usage.completion_tokens)
    assert row["completion_tokens"] == 20
    assert row["usage_source"] == "upstream"


async def test_stream_with_include_usage_passes_the_chunk_through(sdk):
    running, proxied, _ = sdk
    chunks = [
        c
        async for c in await proxied.chat.completions.create(
            **ask(12, stream=True, stream_options={"include_usage": True})
        )
    ]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    [row] = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, 12)


async def test_two_concurrent_streams_are_both_exact(sdk):
    running, proxied, _ = sdk

    async def one(n: int) -> int:
        stream = await proxied.chat.completions.create(**ask(n, stream=True))
        return len([c async for c in stream if c.choices and c.choices[0].delta.content])

    produced = await asyncio.gather(one(30), one(40))
    rows = await running.stored(2)
    assert sorted(r["completion_tokens"] for r in rows) == [30, 40]
    assert all(r["outcome"] == "completed" and r["usage_source"] == "upstream" for r in rows)
    assert sorted(produced) == [30, 40]  # one content delta per token


async def idle_after(server: LlamaServer, window: float = 0.2, limit: float = 5.0) -> float:
    """Seconds from now until the server's CPU time stops growing (less than 20 ms of CPU in a `window`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = server.cpu_seconds()
    while loop.time() - start < limit:
        await asyncio.sleep(window)
        now = server.cpu_seconds()
        if now - last < 0.02:
            return loop.time() - start - window
        last = now
    return limit


async def test_client_disconnect_stops_generation_on_the_server(sdk, llama):
    running, proxied, _ = sdk
    stream = await proxied.chat.completions.create(**ask(3000, stream=True))  # ~15 s of generation if left alone
    loop = asyncio.get_running_loop()
    got, cpu_at_20, t_at_20 = 0, 0.0, 0.0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            got += 1
            if got == 20:
                cpu_at_20, t_at_20 = llama.cpu_seconds(), loop.time()
            if got == 60:
                break
    busy = (llama.cpu_seconds() - cpu_at_20) / (loop.time() - t_at_20)
    assert busy > 0.5, f"the measurement cannot tell busy from idle: {busy:.2f} CPU s/s while generating"
    await stream.close()  # the client hangs up mid-generation
    idle = await idle_after(llama)
    print(f"\nllama-server: {busy:.2f} CPU s/s while streaming; idle {idle:.2f} s after the client disconnected")
    assert idle < 1.0, f"llama-server kept generating for {idle:.2f} s after the client left"
    async with aiohttp.ClientSession() as client, client.get(llama.url + "/slots") as resp:
        slots = await resp.json()
    assert not any(slot.get("is_processing") for slot in slots)
    [row] = await running.stored(1)
    assert row["outcome"] == "client_disconnected"
    assert row["usage_source"] == "counted"
    assert 60 <= row["completion_tokens"] <= 100  # what had been produced when the client left, not 3000


NATIVE = [
    ("/tokenize", {"content": "hello world"}),
    ("/completion", {"prompt": "Tell me about the sidecar", "n_predict": 6, "temperature": 0}),
    ("/v1/rerank", {"model": "tiny", "query": "sidecar", "documents": ["a proxy", "a boat"]}),
]


async def test_llama_cpp_preset_native_routes_answer_as_llama_server_does(llama, sidecar_factory):
    """With `upstream.kind = "llama.cpp"`: tokenize, the native completion and rerank through the sidecar give
    llama-server's own answers (and headers), and each is recorded with the usage its answer carries."""
    running = await sidecar_factory(llama.url, upstream__kind="llama.cpp")
    answers = {}
    async with aiohttp.ClientSession() as s:
        for path, body in NATIVE:
            async with s.post(running.url + path, json=body) as r:
                proxied = (r.status, await r.json(), r.headers)
            async with s.post(llama.url + path, json=body) as r:
                direct = (r.status, await r.json(), r.headers)
            assert proxied[0] == direct[0] == 200, path
            assert proxied[2]["server"] == direct[2]["server"] == "llama.cpp"
            assert proxied[2]["content-type"] == direct[2]["content-type"]
            answers[path] = (proxied[1], direct[1])
    tokens, ref_tokens = answers["/tokenize"]
    assert tokens == ref_tokens
    completion, ref_completion = answers["/completion"]
    assert completion["content"] == ref_completion["content"]  # greedy: the same text
    assert completion["tokens_predicted"] == ref_completion["tokens_predicted"] == 6
    rerank, ref_rerank = answers["/v1/rerank"]
    assert [r["index"] for r in rerank["results"]] == [r["index"] for r in ref_rerank["results"]]
    rows = {r["path"]: r for r in await running.stored(3)}
    assert (rows["/tokenize"]["prompt_tokens"], rows["/tokenize"]["completion_tokens"]) == (len(tokens["tokens"]), 0)
    native = rows["/completion"]
    assert (native["prompt_tokens"], native["completion_tokens"]) == (
        completion["tokens_evaluated"],
        completion["tokens_predicted"],
    )
    assert rows["/v1/rerank"]["prompt_tokens"] == rerank["usage"]["prompt_tokens"]
    assert all(r["usage_source"] == "upstream" for r in rows.values())


async def test_llama_cpp_native_stream_is_relayed_unchanged_and_counted(llama, sidecar_factory):
    running = await sidecar_factory(llama.url, upstream__kind="llama.cpp")
    body = {"prompt": "Tell me about the sidecar", "n_predict": 8, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/completion", json=body) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = await r.read()
    events = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(e.get("content", "") for e in events)  # text arrived
    last = events[-1]
    assert last["stop"] is True and last["tokens_predicted"] == 8
    [row] = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (
        last["tokens_evaluated"],
        8,
        "upstream",
    )
    assert row["stream"] is True and row["ttft_ms"] is not None
