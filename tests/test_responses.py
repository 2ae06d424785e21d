"""The OpenAI Responses API (`POST /v1/responses`, llama-server's `/responses`) end to end: the usage of a whole
answer and of each final event, the output deltas a stream the client left is charged for, the audit record of
a stream (the `response` object the client would have got, or what was relayed of it), and `background`."""

from __future__ import annotations

import asyncio
import glob
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.wire.sse import StreamScanner, count_deltas, delta_patterns
from sidecar.wire.tokens import estimate_prompt
from sidecar.wire.usage import usage_from
from tests.support.clients import open_stream
from tests.support.fake_upstream import Script, response_events, response_object, sse_event
from tests.support.waits import wait_for

BODY: dict[str, Any] = {"model": "m", "input": "Tell me about the sidecar.", "max_output_tokens": 64}
STREAMED = {**BODY, "stream": True}
USAGE = {
    "input_tokens": 11,
    "input_tokens_details": {"cached_tokens": 4},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 18,
}


def event(kind: str, spaced: bool = False, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, **fields}).decode()
    if spaced:
        data = data.replace('":', '": ').replace(",", ", ")
    return f"event: {kind}\ndata: {data}\n\n".encode()


def charged(row: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "usage_source")
    return tuple(row[k] for k in keys)


# --- the scanner: usage of the final events, and which deltas are output --------------------------------------


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete", "response.failed"])
def test_each_final_event_carries_the_usage_and_ends_the_stream(final):
    scanner = StreamScanner(family="/v1/responses")
    for kind in ("response.created", "response.in_progress"):  # early events: `"usage": null`
        scanner.feed(event(kind, response={"id": "resp_1", "status": "in_progress", "usage": None}))
    scanner.feed(event("response.output_text.delta", item_id="msg_1", delta="hi"))
    assert scanner.usage is None and not scanner.done
    scanner.feed(event(final, response={"id": "resp_1", "status": final.split(".")[1], "usage": USAGE}))
    assert scanner.usage == usage_from(USAGE) and scanner.usage.cached_tokens == 4
    assert scanner.usage.reasoning_tokens == 2
    assert scanner.done  # no `[DONE]` follows: the final event is the stream's end (the audit's `complete`)


def test_one_output_token_per_output_delta_and_none_for_anything_else():
    counted = [
        event("response.output_text.delta", delta="a"),
        event("response.refusal.delta", delta="no"),
        event("response.reasoning_text.delta", delta="r"),
        event("response.reasoning_summary_text.delta", delta="s"),
        # llama-server's key order (nlohmann sorts keys): `type` comes last
        b'data: {"delta":"b","item_id":"msg_1","type":"response.output_text.delta"}\n\n',
    ]
    tool_deltas = [event("response.function_call_arguments.delta", delta='{"a"')]
    not_counted = [
        event("response.output_text.done", text="ab"),
        event("response.reasoning_text.done", text="r"),
        event("response.function_call_arguments.done", arguments="{}"),
        event("response.output_text.annotation.added", annotation={}),
        event("response.audio.delta", delta="AAAA"),
        event("response.audio.transcript.delta", delta="t"),
        event("response.output_item.added", item={"type": "message", "content": []}),
        event("response.content_part.added", part={"type": "output_text", "text": ""}),
        event("response.completed", response={"usage": USAGE}),
        # a delta whose text names a delta event is one delta (a quote inside a JSON string is escaped)
        event("response.output_text.delta", delta='"type":"response.output_text.delta" x.delta"'),
    ]
    plain, tools = delta_patterns("/v1/responses", False), delta_patterns("/v1/responses", True)
    region = b"".join(counted + tool_deltas + not_counted)
    assert count_deltas(region, plain) == len(counted) + 1
    assert count_deltas(region, tools) == len(counted) + len(tool_deltas) + 1
    spaced = b"".join(event(e.split(b"\n")[0][7:].decode(), spaced=True, delta="x") for e in counted[:4])
    assert count_deltas(spaced, delta_patterns("/v1/responses", False, spaced=True)) == 4
    scanner = StreamScanner(family="/responses", tools=False)
    scanner.feed(spaced)  # the scanner sees the spacing and counts each of them
    assert scanner.deltas == 4 and scanner.first_output


# --- through a sidecar: usage of whole and streamed answers ------------------------------------------------------


@pytest.mark.parametrize("incomplete", [False, True], ids=["completed", "incomplete"])
async def test_a_whole_response_is_charged_the_usage_it_reports(fake, sidecar, incomplete):
    fake.script = Script(chunks=6, reasoning_chunks=2, cached_tokens=4, incomplete=incomplete)
    async with aiohttp.ClientSession() as s, s.post(sidecar.url + "/v1/responses", json=BODY) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["object"] == "response" and answer["status"] == ("incomplete" if incomplete else "completed")
    assert answer["output"][1]["content"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 tok5 "
    (row,) = await sidecar.stored(1)
    assert charged(row) == (11, 8, 4, 2, "upstream")


@pytest.mark.parametrize("incomplete", [False, True], ids=["completed", "incomplete"])
async def test_a_streamed_response_is_charged_the_usage_of_its_final_event(fake, sidecar, incomplete):
    fake.script = Script(chunks=6, reasoning_chunks=2, tool_chunks=3, cached_tokens=4, incomplete=incomplete)
    async with aiohttp.ClientSession() as s, s.post(sidecar.url + "/v1/responses", json=STREAMED) as r:
        assert r.status == 200
        body = await r.read()
    assert body == fake.sent[r.headers["x-request-id"]]  # relayed as it came
    (row,) = await sidecar.stored(1)
    assert charged(row) == (11, 11, 4, 2, "upstream") and row["outcome"] == "completed"
    assert row["ttft_ms"] is not None


# --- a client that leaves ----------------------------------------------------------------------------------------


async def read_until(reader: asyncio.StreamReader, needle: bytes, count: int = 1) -> bytes:
    seen = b""
    while seen.count(needle) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, seen
        seen += chunk
    return seen


async def test_a_stream_the_client_left_is_charged_at_least_the_deltas_relayed(fake, sidecar):
    fake.script = Script(chunks=8, hang_after=6)  # the upstream stops after 6 of its 8 text deltas
    reader, writer = await open_stream(sidecar.port, STREAMED, path="/v1/responses")
    seen = await read_until(reader, b'data: {"type":"response.output_text.delta"', 5)
    writer.transport.abort()
    (row,) = await sidecar.stored(1)
    relayed = seen.count(b'"type":"response.output_text.delta"')
    assert row["outcome"] == "client_disconnected" and row["usage_source"] == "counted"
    assert relayed <= row["completion_tokens"] <= 6, (relayed, row)
    assert row["prompt_tokens"] == estimate_prompt(STREAMED)  # no usage came: the prompt is the estimate
    await wait_for(lambda: fake.last().closed_at is not None, 3)


async def test_a_client_gone_after_the_final_event_is_charged_the_upstreams_usage(fake, sidecar):
    script = Script(chunks=8, cached_tokens=3)

    async def completed_then_silent(request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for n, (kind, fields) in enumerate(response_events(doc, script)):
            await resp.write(sse_event(kind, fields, n, False))
        await asyncio.sleep(3600)  # the connection stays open: the relay is still reading when the client goes
        return resp

    fake.handler = completed_then_silent
    reader, writer = await open_stream(sidecar.port, STREAMED, path="/v1/responses")
    await read_until(reader, b"event: response.completed")
    writer.transport.abort()
    (row,) = await sidecar.stored(1)
    assert row["outcome"] == "client_disconnected"
    assert charged(row) == (11, 8, 3, 0, "upstream")


# --- background: refused, since what it generates later is read back uncharged ----------------------------------


@pytest.mark.parametrize("value", [True, "true", 1])
async def test_background_is_refused_before_the_upstream(fake, sidecar, value):
    async with (
        aiohttp.ClientSession() as s,
        s.post(sidecar.url + "/v1/responses", json={**BODY, "background": value}) as r,
    ):
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["param"] == "background" and error["type"] == "invalid_request_error"
    assert error["code"] == ("unsupported_parameter" if value is True else "invalid_type")
    assert fake.received == []
    async with (
        aiohttp.ClientSession() as s,
        s.post(sidecar.url + "/v1/responses", json={**BODY, "background": False}) as r,
    ):
        assert r.status == 200


# --- audit: the response object the client got -------------------------------------------------------------------


def audit_records(where: Any) -> list[dict[str, Any]]:
    found = []
    for path in sorted(glob.glob(f"{where}/audit-*.jsonl")):
        with open(path, "rb") as lines:
            found += [orjson.loads(line) for line in lines if line.strip()]
    return found


def meaning(response: dict[str, Any]) -> dict[str, Any]:
    """What a response says: its id, model, status, each output item's kind, text and call, and its usage."""
    items = []
    for item in response["output"]:
        texts = [part.get("text") for part in item.get("content") or ()]
        items.append((item["type"], item.get("id"), texts, item.get("name"), item.get("arguments")))
    return {k: response.get(k) for k in ("id", "model", "status", "usage")} | {"output": items}


@pytest.fixture
async def audited(fake, sidecar_factory, tmp_path):
    return await sidecar_factory(fake.url, audit__capture="all", audit__jsonl_dir=str(tmp_path / "audit"))


async def test_an_audited_stream_is_the_response_object_of_the_whole_answer(fake, audited, tmp_path):
    fake.script = Script(chunks=12, reasoning_chunks=3, tool_chunks=4, cached_tokens=2)
    async with aiohttp.ClientSession() as s:
        async with s.post(audited.url + "/v1/responses", json=BODY) as r:
            whole = await r.json()
        async with s.post(audited.url + "/v1/responses", json=STREAMED) as r:
            await r.read()
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 2)
    plain, streamed = audit_records(tmp_path / "audit")
    assert plain["response"] == whole
    assert streamed["complete"] is True and streamed["response"] == whole  # the final event's own object
    assert meaning(streamed["response"])["output"][2] == (
        "function_call",
        "fc_fake",
        [],
        "get_weather",
        '{"city": "c1c2c3',
    )


async def test_an_audited_stream_the_client_left_is_what_was_relayed(fake, audited, tmp_path):
    fake.script = Script(chunks=40, reasoning_chunks=2, hang_after=5)
    reader, writer = await open_stream(audited.port, STREAMED, path="/v1/responses")
    await read_until(reader, b'"type":"response.output_text.delta"', 5)
    writer.transport.abort()
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 1)
    (record,) = audit_records(tmp_path / "audit")
    got = record["response"]
    assert record["complete"] is False and record["outcome"] == "client_disconnected"
    whole = response_object(STREAMED, Script(chunks=5, reasoning_chunks=2))
    assert got["status"] == "incomplete" and got["incomplete_details"] == {"reason": "stream_ended"}
    assert got["usage"] is None and record["usage"]["usage_source"] == "counted"
    assert meaning(got)["output"] == meaning(whole)["output"]  # reasoning done, the 5 text deltas relayed
    assert (got["id"], got["model"], got["object"]) == ("resp_fake", "m", "response")


def test_the_fold_is_incremental_and_reads_llama_servers_events():
    """llama-server's events name items by `item_id` only (no output_index, no content_part for reasoning)."""
    events = [
        event("response.created", response={"id": "resp_x", "object": "response", "status": "in_progress"}),
        event("response.output_item.added", item={"id": "rs_1", "type": "reasoning", "summary": [], "content": []}),
        event("response.reasoning_text.delta", delta="thin", item_id="rs_1"),
        event("response.reasoning_text.delta", delta="king", item_id="rs_1"),
        event(
            "response.output_item.added", item={"id": "msg_1", "type": "message", "role": "assistant", "content": []}
        ),
        event("response.content_part.added", item_id="msg_1", part={"type": "output_text", "text": ""}),
        event("response.output_text.delta", delta="Hel", item_id="msg_1"),
        event("response.output_text.delta", delta="lo", item_id="msg_1"),
        event("response.output_item.added", item={"id": "fc_1", "type": "function_call", "name": "f", "arguments": ""}),
        event("response.function_call_arguments.delta", delta="{}", item_id="fc_1"),
    ]
    from sidecar.audit.responses import ResponsesFold

    fold = ResponsesFold()
    for one in events:  # one event per fold: nothing is lost between folds
        fold.fold([one[:-2]], b"\n\n")
    assert fold.size() == len("thinkingHello{}")
    got = fold.result()
    assert got["id"] == "resp_x" and got["status"] == "incomplete"
    assert [(i["type"], i.get("content"), i.get("arguments")) for i in got["output"]] == [
        ("reasoning", [{"type": "reasoning_text", "text": "thinking"}], None),
        ("message", [{"type": "output_text", "text": "Hello"}], None),
        ("function_call", None, "{}"),
    ]
    final = {"id": "resp_x", "object": "response", "status": "completed", "output": [], "usage": USAGE}
    fold.fold([event("response.completed", response=final)[:-2]], b"\n\n")
    assert fold.result() == final
