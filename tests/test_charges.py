"""What a client can make the sidecar charge it (#27): no body the sidecar does not read reserves nothing, no field
or decoy steers the prompt estimate down, every answer of `n`, `best_of` and a batch is reserved, and a request
with no output cap reserves what the model can produce (or, enforced, the cap it is given). Each test is a key
with a budget or a tpm that one honest request exceeds, and the same text sent the way a client would use to
slip past it."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.config import UpstreamCfg
from sidecar.upstream.server import Upstream
from tests.support.bodies import CHAT
from tests.support.clients import ADMIN
from tests.support.fake_upstream import Script

PROSE = "The quick brown fox jumps over the lazy dog, again and again. " * 1300  # ~80 KB, ~20,000 tokens
IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 100_000  # 1.1 MB of base64: one image, not 370,000 tokens


async def keyed(fake, sidecar_factory, kind: str = "vllm", **options: Any):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, upstream__kind=kind, **options
    )
    return running


async def new_key(url: str, **fields: Any) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/admin/keys", json={"name": "k", **fields}, headers={"authorization": f"Bearer {ADMIN}"}) as r,
    ):
        body = await r.json()
        assert r.status == 201, body
        return str(body["key"])


async def send(url: str, key: str, path: str, body: bytes | dict[str, Any], content_type: str = "application/json"):
    data = io.BytesIO(body if isinstance(body, bytes) else orjson.dumps(body))  # large ones without a warning
    headers = {"authorization": f"Bearer {key}", "content-type": content_type}
    async with aiohttp.ClientSession() as s, s.post(url + path, data=data, headers=headers) as r:
        return r.status, await r.read()


def refused(status: int, body: bytes, code: str) -> bool:
    return status == 429 and orjson.loads(body)["error"]["code"] == code


# --- bodies the sidecar did not read ------------------------------------------------------------------------


async def test_invocations_are_read_as_the_family_their_body_selects(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    key = await new_key(running.url, budget_tokens=1000, budget_period="day")
    big = {**CHAT, "max_tokens": 2000}
    assert refused(*await send(running.url, key, "/v1/chat/completions", big), "insufficient_quota")
    results = await asyncio.gather(*(send(running.url, key, "/invocations", big) for _ in range(20)))
    assert all(refused(*r, "insufficient_quota") for r in results)  # before: 20 admitted, 100,360 tokens used
    assert fake.received == []
    # within the budget: a stream there gets the hidden usage chunk, its row the model and the upstream's usage
    status, body = await send(running.url, key, "/invocations", {**CHAT, "stream": True, "max_tokens": 20})
    assert status == 200 and b'"usage"' not in body.replace(b'"usage":null', b"")
    assert orjson.loads(fake.last().body)["stream_options"] == {"include_usage": True}
    row = (await running.stored(22))[-1]
    assert (row["path"], row["model"], row["usage_source"]) == ("/invocations", "m", "upstream")
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


async def test_a_json_route_is_read_as_json_whatever_its_content_type(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, kind="llama.cpp")
    key = await new_key(running.url, budget_tokens=1000, budget_period="day")
    big = orjson.dumps({**CHAT, "max_tokens": 2000})
    for label in ("multipart/mixed; boundary=x", "text/plain", "application/octet-stream", ""):
        assert refused(*await send(running.url, key, "/v1/chat/completions", big, label), "insufficient_quota")
        assert refused(*await send(running.url, key, "/completion", big, label), "insufficient_quota")
    status, body = await send(running.url, key, "/v1/chat/completions", b"--x\r\n\r\nhello", "multipart/mixed")
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_json"
    assert fake.received == []  # nothing reached the upstream


async def test_an_upload_reserves_the_default_and_is_charged_it_without_usage(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    form = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF....\r\n--x--\r\n'
    poor = await new_key(running.url, budget_tokens=1000, budget_period="day")
    upload = ("/v1/audio/transcriptions", form, "multipart/form-data; boundary=x")
    assert refused(*await send(running.url, poor, *upload), "insufficient_quota")  # 1,024 reserved: over
    key = await new_key(running.url, budget_tokens=5000, budget_period="day")
    status, _ = await send(running.url, key, *upload)
    assert status == 200 and fake.last().body == form  # passed on untouched
    row = (await running.stored(2))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (1024, 0, "reserved")
    # an upload whose answer carries a usage object is settled to it
    assert (await send(running.url, key, "/v1/audio/translations", form, "multipart/form-data; boundary=x"))[0] == 200
    row = (await running.stored(3))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (300, 40, "upstream")


# --- the prompt estimate ------------------------------------------------------------------------------------

STEERED = [
    (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "documents": [{"text": PROSE}]},
    ),
    ("/v1/responses", {"model": "m", "input": "hi", "instructions": PROSE}),
    ("/v1/messages", {"model": "m", "max_tokens": 10, "messages": [], "system": PROSE}),
    ("/infill", {"input_prefix": PROSE, "input_suffix": "x", "input_extra": [{"text": "y"}]}),
    ("/v1/rerank", {"model": "m", "query": PROSE, "documents": ["a", "b"]}),
    ("/v1/rerank", {"model": "m", "query": "q", "documents": [PROSE], "input": 0}),  # a decoy key
    ("/v1/completions", {"model": "m", "prompt": PROSE, "messages": []}),  # a decoy key
]


@pytest.mark.parametrize(("path", "body"), STEERED, ids=[f"{p}:{sorted(b)}" for p, b in STEERED])
async def test_prompt_text_anywhere_counts_and_a_decoy_cannot_lower_it(fake, sidecar_factory, path, body):
    running = await keyed(
        fake, sidecar_factory, kind="custom", upstream__routes=[f"POST {path}", "POST /v1/chat/completions"]
    )
    key = await new_key(running.url, tpm=5000, rpm=1000)
    # a request larger than the whole minute may run when the bucket is full; after one honest request it is not
    assert (await send(running.url, key, "/v1/chat/completions", {**CHAT, "max_tokens": 10}))[0] == 200
    fake.received.clear()
    status, answer = await send(running.url, key, path, {**body, "max_tokens": 10})
    assert status == 429, answer  # before: 21 or 8 tokens estimated, admitted
    assert fake.received == []


async def test_media_counts_per_item_not_by_its_encoded_length(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    # a budget, not a tpm: a tpm bucket refills as the test runs (and admits one request above its capacity
    # when full), so whether five images fit would depend on how fast the machine is
    key = await new_key(running.url, budget_tokens=5000, budget_period="day")
    image = {"type": "image_url", "image_url": {"url": IMAGE}}
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
    }
    assert (await send(running.url, key, "/v1/chat/completions", body))[0] == 200  # ~1,050, not ~370,000
    assert (await send(running.url, key, "/v1/chat/completions", body))[0] == 200  # and again (refunded to 16 each)
    five = {**body, "messages": [{"role": "user", "content": [image] * 5}]}
    assert refused(*await send(running.url, key, "/v1/chat/completions", five), "insufficient_quota")


async def test_a_client_gone_is_charged_no_less_than_the_text_it_sent(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    key = await new_key(running.url)
    fake.script = Script(chunks=50, delay_chunks=0.05, usage=False)
    body = orjson.dumps({"model": "m", "input": "hi", "instructions": PROSE, "stream": True, "max_output_tokens": 50})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(
        b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    seen = b""
    while b"data:" not in seen:
        seen += await asyncio.wait_for(reader.read(65536), 10)
    writer.transport.abort()
    (row,) = await running.stored(1)
    assert row["outcome"] == "client_disconnected", row
    assert row["prompt_tokens"] >= len(PROSE) // 4, row  # before: 8


# --- the output: every answer, and a request with no cap -----------------------------------------------------


async def test_every_choice_and_every_prompt_of_a_batch_is_reserved(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory)
    key = await new_key(running.url, budget_tokens=1000, budget_period="day")
    assert (await send(running.url, key, "/v1/chat/completions", {**CHAT, "max_tokens": 500}))[0] == 200
    tries = [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 500, "n": 10}),
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 200, "n": 1, "best_of": 5}),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 200}),
    ]
    for path, body in tries:
        assert refused(*await send(running.url, key, path, body), "insufficient_quota"), (path, body)


async def test_no_cap_reserves_the_models_context_length(fake, sidecar_factory):
    fake.max_model_len = 2048
    running = await keyed(fake, sidecar_factory)
    key = await new_key(running.url, budget_tokens=1100, budget_period="day")
    assert refused(*await send(running.url, key, "/v1/chat/completions", CHAT), "insufficient_quota")
    # an explicit cap within the budget is admitted; so is llama-server's -1 nowhere (not on this preset)
    assert (await send(running.url, key, "/v1/chat/completions", {**CHAT, "max_tokens": 100}))[0] == 200


async def test_no_cap_where_the_context_is_unknown_reserves_the_default(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, kind="llama.cpp")
    key = await new_key(running.url, budget_tokens=1030, budget_period="day")
    assert refused(*await send(running.url, key, "/v1/chat/completions", CHAT), "insufficient_quota")
    assert refused(
        *await send(running.url, key, "/completion", {"prompt": "hi", "n_predict": -1}), "insufficient_quota"
    )
    assert (await send(running.url, key, "/completion", {"prompt": "hi", "n_predict": 5}))[0] == 200


async def test_an_enforced_cap_is_written_into_a_request_that_names_none(fake, sidecar_factory):
    running = await keyed(fake, sidecar_factory, kind="llama.cpp", limits__enforce_max_tokens=True)
    key = await new_key(running.url)
    assert (await send(running.url, key, "/v1/chat/completions", CHAT))[0] == 200
    assert orjson.loads(fake.last().body)["max_tokens"] == 1024  # written into the forwarded body
    assert (await send(running.url, key, "/completion", {"prompt": "hi", "n_predict": -1}))[0] == 200
    assert orjson.loads(fake.last().body)["n_predict"] == 1024  # llama-server's "no limit" is given one
    assert (await send(running.url, key, "/completion", {"prompt": "hi", "n_predict": 5}))[0] == 200
    assert orjson.loads(fake.last().body)["n_predict"] == 5  # a named cap is left as it is


async def test_the_model_list_is_asked_again_after_a_failure_and_an_unlisted_model_gets_the_longest():
    """`upstream/models.ModelList` against a real server whose list fails first (a vLLM still loading)."""
    listing: dict[str, Any] = {"status": 503}

    async def models(request: web.Request) -> web.Response:
        if listing["status"] != 200:
            return web.Response(status=listing["status"])
        data = [{"id": "small", "max_model_len": 4096}, {"id": "big", "max_model_len": 32768}, {"id": "embed"}]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    upstream = Upstream(UpstreamCfg(kind="vllm"), f"http://127.0.0.1:{server.port}/v1", "")
    await upstream.open()
    try:
        assert await upstream.models.context("small") is None  # waits for the first ask, which failed
        listing["status"] = 200
        await upstream.models.refresh()
        assert await upstream.models.context("small") == 4096
        assert await upstream.models.context("an-alias") == 32768  # not listed: the longest, never less
        assert await upstream.models.context(None) == 32768
        assert upstream.models.names == frozenset({"small", "big", "embed"})
        listing["status"] = 500
        await upstream.models.refresh()
        assert await upstream.models.context("small") == 4096  # a failed ask keeps what was known
        other = Upstream(UpstreamCfg(kind="llama.cpp"), f"http://127.0.0.1:{server.port}/v1", "")
        assert await other.models.context("small") is None  # a preset whose list gives no lengths: never asked
    finally:
        await upstream.close()
        await server.close()
