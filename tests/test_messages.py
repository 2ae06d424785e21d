"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) through the sidecar: usage read from
`message_start` and the final `message_delta`, a disconnect settled from the relayed `content_block_delta`s,
`count_tokens` charged as a tokenizer call, errors in Anthropic's shape, `x-api-key` and `anthropic-version`,
and an audited stream folded into the `message` the client would have got."""

from __future__ import annotations

import asyncio
import glob

import aiohttp
import orjson
import pytest

from sidecar.audit.aggregate import StreamCapture
from sidecar.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    anthropic_body,
)
from sidecar.wire.sse import StreamScanner
from sidecar.wire.usage import Usage
from tests.support.clients import ADMIN, admin, open_stream, post
from tests.support.fake_upstream import Script, anthropic_events, anthropic_message
from tests.support.waits import free_port, wait_for

BODY = {"model": "fake-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**BODY, "stream": True}


def scanned(events: list[bytes], spaced: bool = False, reads: int = 1) -> StreamScanner:
    """A Messages stream's events through a scanner, in `reads` reads (1: the whole stream in one)."""
    body = b"".join(events)
    if spaced:
        body = body.replace(b'":', b'": ')
    scanner = StreamScanner(family="messages")
    size = -(-len(body) // reads)
    for at in range(0, len(body), size):
        scanner.feed(body[at : at + size])
    scanner.flush()
    return scanner


# --- the scanner ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reads", [1, 3, 1000])
@pytest.mark.parametrize("spaced", [False, True])
def test_usage_of_message_start_and_message_delta_is_merged_however_the_stream_is_read(reads, spaced):
    script = Script(chunks=8, thinking=2, tool=True)
    events = [e for _, e in anthropic_events(BODY, script)]
    scanner = scanned(events, spaced, reads)
    # input 4 + cache read 3 + cache write 4; output: 2 thinking + 8 text + 3 tool-input deltas
    assert scanner.usage == Usage(11, 13, 3, 4, None)
    assert scanner.deltas == 13  # text, thinking and input_json deltas; the signature_delta is not output
    assert scanner.done and not scanner.usage_partial


def test_vllm_message_delta_that_repeats_the_input_keeps_the_same_figures():
    vllm = Script(chunks=4, delta_input=True, cache_read_tokens=None, cache_write_tokens=None)  # no cache figures
    events = [e for _, e in anthropic_events(BODY, vllm)]
    assert scanned(events).usage == Usage(11, 4, None, None, None)


def test_a_cut_stream_knows_its_usage_is_message_start_s_input_alone():
    events = [e for _, e in anthropic_events(BODY, Script(chunks=8))]
    scanner = scanned(events[:7])  # message_start, ping, block start, four text deltas
    assert scanner.usage_partial and scanner.usage is not None
    assert (scanner.usage.prompt_tokens, scanner.deltas, scanner.done) == (11, 4, False)


def test_nothing_is_stripped_from_a_messages_stream():
    events = b"".join(e for _, e in anthropic_events(BODY, Script(chunks=3)))
    scanner = StreamScanner(strip_usage=False, family="messages")
    assert scanner.feed(events) == events


# --- through the sidecar ----------------------------------------------------------------------------------------


@pytest.fixture
async def vllm(fake, sidecar_factory):
    """A sidecar with the `vllm` preset (which routes both Messages paths) in front of the fake."""
    return await sidecar_factory(fake.url, upstream__kind="vllm")


async def read_deltas(reader: asyncio.StreamReader, n: int) -> bytes:
    seen = b""
    while seen.count(b'"text_delta"') < n:
        seen += await reader.read(65536)
    return seen


async def test_a_disconnect_is_charged_message_start_s_input_and_the_relayed_deltas(fake, vllm):
    fake.script.chunks, fake.script.delay_chunks = 8, 0.3
    reader, writer = await open_stream(vllm.port, STREAM, path="/v1/messages")
    seen = await read_deltas(reader, 5)
    writer.transport.abort()
    await wait_for(lambda: len(vllm.rows) == 1)
    row = vllm.rows[0]
    assert (row["outcome"], row["status"], row["usage_source"]) == ("client_disconnected", 499, "counted")
    assert row["completion_tokens"] >= seen.count(b'"text_delta"') >= 5
    # message_start said the input exactly: the prompt is the upstream's figure, with its cache details
    assert (row["prompt_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (11, 3, 4)


async def test_a_disconnect_before_message_start_is_charged_the_estimate(fake, vllm):
    fake.script.delay_first = 30  # headers out, no event yet
    _reader, writer = await open_stream(vllm.port, STREAM, path="/v1/messages")
    await wait_for(lambda: len(fake.received) == 1)
    await asyncio.sleep(0.2)
    writer.transport.abort()
    await wait_for(lambda: len(vllm.rows) == 1)
    row = vllm.rows[0]
    assert (row["outcome"], row["usage_source"], row["completion_tokens"]) == ("client_disconnected", "counted", 0)
    assert row["prompt_tokens"] and row["cached_tokens"] is None  # the sidecar's estimate of the prompt


# --- audit: a stream folded into its message --------------------------------------------------------------------


def audit_records(audit_dir) -> list[dict]:
    out = []
    for path in sorted(glob.glob(f"{audit_dir}/audit-*.jsonl")):
        with open(path, "rb") as f:
            out += [orjson.loads(line) for line in f if line.strip()]
    return out


@pytest.mark.parametrize("every", [1, 4, 1000])
def test_a_stream_folded_in_any_steps_is_the_whole_message(every):
    script = Script(chunks=6, thinking=2, tool=True)
    events = [e for _, e in anthropic_events(BODY, script)]
    capture = StreamCapture(1 << 20, "messages")
    for at in range(0, len(events), every):  # each fold a list of regions, as the scanner hands them over
        capture.fold([e.rstrip(b"\n") for e in events[at : at + every]], b"\n\n")
    assert capture.result() == anthropic_message(BODY, script)


async def test_an_audited_stream_is_recorded_as_the_message_the_client_would_have_got(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url, upstream__kind="llama.cpp", audit__capture="all", audit__jsonl_dir=str(tmp_path / "a")
    )
    fake.script.thinking, fake.script.tool = 2, True
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/messages", json=BODY) as r:
            whole = await r.json()
        async with s.post(running.url + "/v1/messages", json=STREAM) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            await r.read()
    await wait_for(lambda: len(audit_records(tmp_path / "a")) == 2)
    plain, streamed = audit_records(tmp_path / "a")
    assert whole["type"] == "message" and plain["response"] == whole
    assert streamed["response"] == whole and streamed["complete"] is True
    assert streamed["usage"]["prompt_tokens"] == 11 and streamed["usage"]["completion_tokens"] == 2 + 5 + 3


async def test_a_cut_audited_stream_is_recorded_as_far_as_it_went(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url, upstream__kind="vllm", audit__capture="all", audit__jsonl_dir=str(tmp_path / "a")
    )
    fake.script.chunks, fake.script.drop_after = 8, 4
    async with aiohttp.ClientSession() as s, s.post(running.url + "/v1/messages", json=STREAM) as r:
        body = await r.read()
    assert body.endswith(b"\n\n") and b"event: error\ndata: " in body  # a cut stream says so, in its own shape
    await wait_for(lambda: len(audit_records(tmp_path / "a")) == 1)
    (record,) = audit_records(tmp_path / "a")
    response = record["response"]
    assert record["complete"] is False and response["stop_reason"] is None
    assert response["content"] == [{"type": "text", "text": "tok0 tok1 tok2 tok3 "}]
    assert response["usage"]["input_tokens"] == 4 and response["usage"]["output_tokens"] == 0  # message_start's
    assert (record["usage"]["completion_tokens"], record["usage"]["usage_source"]) == (4, "counted")


async def test_a_long_audited_stream_is_cut_at_the_cap(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url,
        upstream__kind="vllm",
        audit__capture="all",
        audit__jsonl_dir=str(tmp_path / "a"),
        audit__max_payload_bytes=20_000,
    )
    fake.script.chunks = 4000  # ~600 KB of events: folded more than once
    async with aiohttp.ClientSession() as s, s.post(running.url + "/v1/messages", json=STREAM) as r:
        await r.read()
    await wait_for(lambda: len(audit_records(tmp_path / "a")) == 1)
    (record,) = audit_records(tmp_path / "a")
    assert record["response"]["truncated"] is True and record["usage"]["completion_tokens"] == 4000
    assert len(orjson.dumps(record)) <= 20_000


# --- count_tokens: a tokenizer call -------------------------------------------------------------------------------


async def test_count_tokens_is_charged_its_input_and_no_output(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, upstream__kind="llama.cpp", limits__tpm=1000, limits__default_max_tokens=500
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/messages/count_tokens", json=BODY) as r:
            assert r.status == 200 and await r.json() == {"input_tokens": 12}
            # nothing reserved for output: the lease held the prompt's estimate alone
            assert int(r.headers["x-ratelimit-remaining-tokens"]) > 1000 - 64
    (row,) = await running.stored(1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (12, 0, "upstream")


# --- errors in Anthropic's shape, x-api-key, anthropic-version ------------------------------------------------------


def anthropic_error(body: bytes, kind: str) -> str:
    doc = orjson.loads(body)
    assert doc["type"] == "error" and set(doc) == {"type", "error"} and doc["error"]["type"] == kind, doc
    assert set(doc["error"]) == {"type", "message"} and doc["error"]["message"]
    return doc["error"]["message"]


@pytest.fixture
async def keyed(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__kind="vllm", auth__enabled=True, server__admin_token=ADMIN)
    async with aiohttp.ClientSession() as s:
        _, made, _ = await admin(
            s, "POST", running.url + "/admin/keys", {"name": "a", "rpm": 2, "models": ["fake-model"]}
        )
    running.extra["key"] = made["key"]
    return running


async def test_the_sidecar_s_own_errors_speak_anthropic_on_the_messages_paths(fake, keyed):
    url, key = keyed.url, keyed.extra["key"]
    good = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    cases = [
        ("/v1/messages", BODY, {"x-api-key": "sk-nope"}, 401, "authentication_error"),
        ("/v1/messages/count_tokens", BODY, {}, 401, "authentication_error"),
        ("/v1/messages", BODY, {"x-api-key": key, "authorization": "Bearer sk-other"}, 401, "authentication_error"),
        ("/v1/messages", {**BODY, "model": "other"}, good, 403, "permission_error"),
        ("/v1/messages/batches", BODY, good, 404, "not_found_error"),
        ("/v1/messages", b"{not json", {**good, "content-type": "application/json"}, 400, "invalid_request_error"),
    ]
    for path, body, headers, status, kind in cases:
        got, answer, raw = await post(url + path, body, headers)
        assert got == status and answer["content-type"] == "application/json", (path, got, raw)
        anthropic_error(raw, kind)
    for _ in range(2):  # the key's rpm (2), used up: then a 429 with its retry-after
        assert (await post(url + "/v1/messages", BODY, good))[0] == 200
    got, answer, raw = await post(url + "/v1/messages", BODY, good)
    assert got == 429 and int(answer["retry-after"]) >= 1
    anthropic_error(raw, "rate_limit_error")
    # OpenAI's shape everywhere else
    got, _, raw = await post(url + "/v1/chat/completions", {"model": "fake-model"}, {"x-api-key": "sk-nope"})
    assert got == 401 and orjson.loads(raw)["error"]["code"] == "invalid_api_key"


async def test_two_different_keys_are_refused_and_one_key_in_x_api_key_is_never_forwarded(fake, keyed, tmp_path):
    url, key = keyed.url, keyed.extra["key"]
    got, _, raw = await post(url + "/v1/chat/completions", BODY, {"x-api-key": key, "authorization": "Bearer x"})
    assert got == 401 and orjson.loads(raw)["error"]["code"] == "conflicting_api_keys"
    got, _, raw = await post(url + "/v1/messages", BODY, {"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert got == 200, raw
    sent = fake.last().headers
    assert sent["anthropic-version"] == "2023-06-01" and "x-api-key" not in sent and "authorization" not in sent
    got, _, _ = await post(url + "/v1/messages", BODY, {"x-api-key": key, "authorization": f"Bearer {key}"})
    assert got == 200  # the same key twice is one key
    assert key not in keyed.log_text()


async def test_413_502_and_504_speak_anthropic(fake, sidecar_factory):
    small = await sidecar_factory(fake.url, upstream__kind="vllm", server__max_body_bytes=100)
    got, _, raw = await post(small.url + "/v1/messages", {**BODY, "pad": "x" * 200})
    assert got == 413
    anthropic_error(raw, "request_too_large")
    slow = await sidecar_factory(fake.url, upstream__kind="vllm", upstream__first_byte_timeout=0.3)
    got, _, raw = await post(slow.url + "/v1/messages", BODY, {"x-fake-script": '{"delay_headers": 5}'})
    assert got == 504
    anthropic_error(raw, "timeout_error")
    gone = await sidecar_factory(f"http://127.0.0.1:{free_port()}", upstream__kind="vllm")
    got, _, raw = await post(gone.url + "/v1/messages/count_tokens", BODY)
    assert got == 502
    anthropic_error(raw, "api_error")


async def test_a_failed_messages_stream_ends_with_an_anthropic_error_event(fake, vllm):
    fake.script.chunks, fake.script.drop_after = 8, 3
    async with aiohttp.ClientSession() as s, s.post(vllm.url + "/v1/messages", json=STREAM) as r:
        body = await r.read()
    last = body.rstrip(b"\n").split(b"\n\n")[-1]
    name, data = last.split(b"\n")
    assert name == b"event: error" and data.startswith(b"data: ")
    assert "broke" in anthropic_error(data[6:], "api_error")


def test_every_error_has_an_anthropic_type():
    kinds = {cls: anthropic_body(cls("x")) for cls in (BadRequest, PayloadTooLarge, NotFound, Forbidden, Unauthorized)}
    assert {cls.__name__: orjson.loads(b)["error"]["type"] for cls, b in kinds.items()} == {
        "BadRequest": "invalid_request_error",
        "PayloadTooLarge": "request_too_large",
        "NotFound": "not_found_error",
        "Forbidden": "permission_error",
        "Unauthorized": "authentication_error",
    }
    for err, kind in (
        (RateLimited("x"), "rate_limit_error"),
        (Overloaded("x"), "overloaded_error"),
        (ShuttingDown("x"), "overloaded_error"),
        (UpstreamError("x"), "api_error"),
        (UpstreamTimeout("x"), "timeout_error"),
        (RequestTimeout("x"), "invalid_request_error"),
    ):
        assert orjson.loads(anthropic_body(err)) == {"type": "error", "error": {"type": kind, "message": "x"}}
