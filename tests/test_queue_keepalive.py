"""Streams that wait: a streamed request held in the dispatch queue keeps its client connection alive with SSE
comments (`server.sse_keepalive`), then gets the upstream's stream in the answer already started, or an SSE
error event when it is refused or the upstream fails; a client that leaves while queued frees its place at once.

One global slot (`limits.global_concurrency = 1`) held by a stream the fake upstream never finishes (a raw
socket the test closes to free the slot): the queue's order is driven by the test, never by wall-clock bounds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support.bodies import CHAT, STREAM
from tests.support.clients import open_stream
from tests.support.waits import wait_for

KEEPALIVE = b": keepalive\n\n"
HANG = {"x-fake-script": orjson.dumps({"hang_after": 0}).decode()}  # holds the one slot until its client leaves


@pytest.fixture
async def queue_of_one(fake, sidecar_factory):
    """Starts a sidecar with one global slot and holds that slot: (the sidecar, the holder's socket writer, which
    frees the slot when closed). Every holder is closed when the test ends."""
    writers = []

    async def start(**options: Any) -> tuple[Any, asyncio.StreamWriter]:
        options = {
            "upstream__kind": "vllm",  # it serves /v1/messages too
            "limits__global_concurrency": 1,
            "limits__queue_timeout": 5,
            "server__sse_keepalive": 0.2,
            **options,
        }
        running = await sidecar_factory(fake.url, **options)
        _, writer = await open_stream(running.port, STREAM, HANG)
        writers.append(writer)
        await wait_for(lambda: len(fake.received) == 1)  # it holds the slot: the next request queues
        return running, writer

    yield start
    for writer in writers:
        writer.close()


async def depth(running) -> float:
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        text = await r.text()
    line = next(ln for ln in text.splitlines() if ln.startswith('sidecar_lease_queue_depth{priority="normal"}'))
    return float(line.rpartition(" ")[2])


async def comments(resp: aiohttp.ClientResponse, count: int) -> bytes:
    """Reads the answer until `count` keepalive comments came (what was read)."""
    seen = b""
    async with asyncio.timeout(10):
        while seen.count(KEEPALIVE) < count:
            seen += await resp.content.readany()
    return seen


async def send(s: aiohttp.ClientSession, url: str, client_id: str) -> int:
    async with s.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": client_id}) as r:
        await r.read()
        return r.status


def row_of(rows: list[dict[str, Any]], client_id: str) -> dict[str, Any]:
    (row,) = [r for r in rows if r["client_request_id"] == client_id]
    return row


async def test_a_queued_stream_is_kept_alive_then_relayed_whole(fake, queue_of_one):
    running, blocker = await queue_of_one()
    body = {**STREAM, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as s,
        s.post(running.url + "/v1/chat/completions", json=body, headers={"x-request-id": "waits"}) as r,
    ):
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"].startswith("req_")
        seen = await comments(r, 3)
        assert seen.startswith(KEEPALIVE) and await depth(running) == 1  # still queued: nothing relayed yet
        blocker.close()  # the slot comes free: the queued stream is dispatched
        seen += await r.content.read()
    events = seen.replace(KEEPALIVE, b"")
    sent = fake.sent[fake.received[-1].headers["x-request-id"]]
    assert events == sent  # the upstream's whole stream, as it sent it
    assert events.endswith(b"data: [DONE]\n\n")
    row = row_of(await running.stored(2), "waits")
    assert (row["status"], row["outcome"], row["error_code"]) == (200, "completed", None)
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == ("upstream", 11, 5)


async def test_a_queued_non_stream_request_is_not_answered_early(fake, queue_of_one):
    running, blocker = await queue_of_one()
    reader, writer = await open_stream(running.port, CHAT)  # the same wait, without `stream`
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.7):  # over three keepalive periods
            await reader.read(1)
    blocker.close()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" not in head.lower()
    writer.close()


async def test_with_keepalive_off_a_queued_stream_gets_no_comment(fake, queue_of_one):
    running, blocker = await queue_of_one(server__sse_keepalive=0)
    reader, writer = await open_stream(running.port, STREAM)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.7):
            await reader.read(1)
    blocker.close()
    async with asyncio.timeout(10):
        answer = await reader.readuntil(b"data: [DONE]\n\n")
    assert answer.startswith(b"HTTP/1.1 200") and KEEPALIVE not in answer
    writer.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_queue_timeout_after_the_stream_started_is_an_error_event(fake, queue_of_one, path):
    running, _blocker = await queue_of_one(limits__queue_timeout=0.8)
    body = {**STREAM, "max_tokens": 16}
    async with (
        aiohttp.ClientSession() as s,
        s.post(running.url + path, json=body, headers={"x-request-id": "refused"}) as r,
    ):
        assert r.status == 200
        seen = await comments(r, 2) + await r.content.read()
    assert b"[DONE]" not in seen
    event = seen.replace(KEEPALIVE, b"")
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    error = orjson.loads(event.split(b"data: ", 1)[1])
    if path == "/v1/messages":  # the shape the client's SDK parses
        assert error == {"type": "error", "error": {"type": "overloaded_error", "message": error["error"]["message"]}}
    else:
        assert (error["error"]["type"], error["error"]["code"]) == ("server_overloaded", "queue_timeout")
    row = row_of(await running.stored(2), "refused")
    assert (row["status"], row["outcome"], row["error_code"]) == (503, "rate_limited", "queue_timeout")
    assert row["usage_source"] == "none" and row["upstream_status"] is None
    assert len(fake.received) == 1  # only the blocker reached the upstream


async def test_an_upstream_error_after_the_stream_started_is_an_error_event(fake, queue_of_one):
    running, blocker = await queue_of_one()
    headers = {"x-request-id": "failed", "x-fake-script": orjson.dumps({"status": 500}).decode()}
    async with (
        aiohttp.ClientSession() as s,
        s.post(running.url + "/v1/chat/completions", json=STREAM, headers=headers) as r,
    ):
        assert r.status == 200
        seen = await comments(r, 1)
        blocker.close()
        seen += await r.content.read()
    event = seen.replace(KEEPALIVE, b"")
    assert event.startswith(b"event: error\ndata: ") and b"[DONE]" not in event
    error = orjson.loads(event.split(b"data: ", 1)[1])["error"]
    assert error["message"] == "fake failure" and error["code"] == "upstream_status"
    row = row_of(await running.stored(2), "failed")
    assert (row["status"], row["outcome"], row["error_code"]) == (500, "upstream_error", "upstream_status")
    assert row["upstream_status"] == 500


async def test_a_kept_alive_client_that_leaves_frees_its_place_at_once(fake, queue_of_one):
    running, blocker = await queue_of_one()
    reader, writer = await open_stream(running.port, STREAM, {"x-request-id": "left"})
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await reader.readuntil(KEEPALIVE)  # kept alive while queued
    async with aiohttp.ClientSession() as s:
        after = asyncio.create_task(send(s, running.url, "next"))
        async with asyncio.timeout(10):
            while await depth(running) != 2:
                await asyncio.sleep(0.01)
        writer.close()  # leaves while queued
        async with asyncio.timeout(10):
            while await depth(running) != 1:  # its place is gone before anything else moves
                await asyncio.sleep(0.01)
        blocker.close()
        assert await after == 200
    assert [r.headers.get("x-fake-script") is None for r in fake.received] == [False, True]  # blocker, then next
    assert [orjson.loads(r.body).get("stream") for r in fake.received] == [True, None]  # never the one that left
    row = row_of(await running.stored(3), "left")
    assert (row["status"], row["outcome"], row["error_code"]) == (499, "client_disconnected", "client_disconnected")
    assert (row["usage_source"], row["prompt_tokens"], row["upstream_status"]) == ("none", None, None)
