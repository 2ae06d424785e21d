"""The relay's contract end to end over real sockets: exact bytes, status, headers, request log rows, metrics,
and whether the upstream connection was reused or closed, for whole, large, streamed and failed answers."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.support.bodies import CHAT, CHAT_PATH, STREAM
from tests.support.clients import post
from tests.support.fake_upstream import FakeUpstream
from tests.support.waits import free_port, wait_for

BIG = 1_500_000  # over relay.BUFFERED (1 MiB): relayed as it arrives


def big_body(size: int = BIG) -> bytes:
    head = b'{"id":"x","pad":"'
    tail = b'","usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


@pytest.fixture
async def upstream(fake: FakeUpstream) -> FakeUpstream:
    """The fake upstream, answering with the handler each test sets."""
    return fake


async def metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


def errors_line(reason: str, n: int = 1) -> str:
    return f'sidecar_upstream_errors_total{{reason="{reason}"}} {float(n)}'


def last_event_error(data: bytes) -> dict[str, Any]:
    last = data.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    return orjson.loads(last.split(b"data: ", 1)[1])["error"]


def paced_body(
    parts: list[bytes], pause: float, status: int = 200, content_type: str = "application/json"
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler with a chunked body: the first part at once, then each next one after `pause` s."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"content-type": content_type})
        await resp.prepare(request)
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            await resp.write(part)
        await resp.write_eof()
        return resp

    return handler


def sse_answer(
    events: bytes, status: int = 200, content_type: str = "text/event-stream"
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler that sends `events` as one streamed body."""
    return paced_body([events], 0.0, status, content_type)


async def raw_request(port: int, body: dict[str, Any], rcvbuf: int | None = None) -> Any:
    """A client on a raw socket that sends one request and reads nothing unless the test says so."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = orjson.dumps(body)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    await writer.drain()
    return reader, writer


# --- whole answers ---------------------------------------------------------------------------------------------


async def test_whole_answer_row_is_exact_and_connection_is_reused(fake, sidecar):
    for _ in range(2):
        status, headers, body = await post(sidecar.url + CHAT_PATH, CHAT)
        assert status == 200 and body == fake.sent[headers["x-request-id"]]
        assert headers["content-length"] == str(len(body))
    row = sidecar.rows[-1]
    assert (row["outcome"], row["status"], row["upstream_status"], row["error_code"]) == ("completed", 200, 200, None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (11, 5, "upstream")
    assert row["bytes_out"] == len(body) and row["ttft_ms"] is not None
    assert [r.closed_at for r in fake.received] == [None, None]
    text = await metrics(sidecar.url)
    counts = [line for line in text.splitlines() if line.startswith("sidecar_upstream_errors_total{")]
    assert counts and all(line.endswith(" 0.0") for line in counts)


async def test_upstream_server_header_and_forwarding_headers(fake, sidecar):
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/v1/models?x=1?y=2") as r:
        assert r.status == 200
        server = r.headers.get("server")
    assert fake.last().query == "x=1?y=2"
    assert fake.last().headers["x-forwarded-for"] == "127.0.0.1"
    assert server is not None and server.startswith("Python/")  # the upstream's own (aiohttp's) Server header


async def test_no_server_and_no_content_type_from_upstream(sidecar_factory):
    """A bare HTTP/1.1 upstream that names no server and no content type: a whole answer, and neither header."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{"usage":1}')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{port}/v1")
        status, headers, body = await post(running.url + CHAT_PATH, CHAT)
        assert status == 200 and body == b'{"usage":1}'
        assert "server" not in headers and "content-type" not in headers, headers
        row = running.rows[-1]
        assert row["outcome"] == "completed" and row["bytes_out"] == 11 and row["chunks"] == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_cors_headers_replace_the_upstreams(upstream, sidecar_factory):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"ok": 1}, headers={"Access-Control-Allow-Origin": "*", "access-control-max-age": "9", "x-up": "1"}
        )

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, server__cors_origins="http://app.example")
    status, headers, body = await post(running.url + CHAT_PATH, CHAT, {"Origin": "http://app.example"})
    assert status == 200 and orjson.loads(body) == {"ok": 1}
    assert headers.getall("access-control-allow-origin") == ["http://app.example"]
    assert "access-control-max-age" not in headers and headers["x-up"] == "1"
    assert headers["vary"] == "Origin"
    status, headers, _ = await post(running.url + CHAT_PATH, CHAT)  # no origin: no CORS, the upstream's dropped
    assert status == 200 and headers.get("access-control-allow-origin") == "*"


async def test_upstream_400_whole_has_no_ttft_and_no_usage(fake, sidecar):
    fake.script.status = 400
    status, _, body = await post(sidecar.url + CHAT_PATH, CHAT)
    assert status == 400 and orjson.loads(body)["error"]["message"] == "fake failure"
    row = sidecar.rows[-1]
    assert (row["status"], row["upstream_status"], row["ttft_ms"], row["usage_source"]) == (400, 400, None, "none")
    assert row["error_code"] != "upstream_status"


async def test_upstream_500_whole_row_and_metric(fake, sidecar):
    fake.script.status = 503
    status, _, body = await post(sidecar.url + CHAT_PATH, CHAT)
    assert status == 503 and orjson.loads(body)["error"]["message"] == "fake failure"
    row = sidecar.rows[-1]
    assert (row["outcome"], row["error_code"], row["status"], row["upstream_status"]) == (
        "upstream_error",
        "upstream_status",
        503,
        503,
    )
    assert row["ttft_ms"] is None and row["bytes_out"] == len(body)
    assert errors_line("status_5xx") in await metrics(sidecar.url)


async def test_embeddings_usage_counts_no_output(fake, sidecar):
    status, _, body = await post(sidecar.url + "/v1/embeddings", {"model": "m", "input": ["a", "b"]})
    assert status == 200 and len(orjson.loads(body)["data"]) == 2
    row = sidecar.rows[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (6, 0, "upstream")


async def test_native_completion_usage_is_read_from_its_own_shape(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__kind="llama.cpp")
    status, _, body = await post(running.url + "/completion", {"prompt": "hi", "n_predict": 4})
    assert status == 200 and orjson.loads(body)["content"] == "hi there"
    row = running.rows[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (7, 2, "upstream")


async def test_native_completion_that_is_not_json_has_no_usage(upstream, sidecar_factory):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"not json {", content_type="application/json")

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, upstream__kind="llama.cpp")
    status, _, body = await post(running.url + "/completion", {"prompt": "hi"})
    assert status == 200 and body == b"not json {"
    row = running.rows[-1]
    assert row["outcome"] == "completed" and row["usage_source"] == "none" and row["ttft_ms"] is not None


async def test_declared_length_over_the_limit_is_a_502_and_closes(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__max_response_bytes=100)
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    err = orjson.loads(body)["error"]
    assert status == 502 and err["type"] == "upstream_error"
    assert re.fullmatch(r"The upstream response is (\d+) bytes, over the configured limit\.", err["message"])
    row = running.rows[-1]
    assert (row["outcome"], row["status"], row["upstream_status"]) == ("upstream_error", 502, 200)


async def test_chunked_whole_over_the_limit_is_a_502(upstream, sidecar_factory):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for _ in range(4):
            await resp.write(b"x" * 40)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, upstream__max_response_bytes=100)
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 502
    assert "over the configured limit of 100 bytes" in orjson.loads(body)["error"]["message"]
    assert running.rows[-1]["outcome"] == "upstream_error"
    running2_status, _, _ = await post(running.url + CHAT_PATH, CHAT)
    assert running2_status == 502 and len(upstream.peers) == 2 and upstream.peers[0] != upstream.peers[1]


async def test_chunked_whole_answer_exactly_at_limit_is_sent(upstream, sidecar_factory):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(b"y" * 60)
        await asyncio.sleep(0.01)
        await resp.write(b"z" * 40)
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, upstream__max_response_bytes=100)
    for _ in range(2):
        status, headers, body = await post(running.url + CHAT_PATH, CHAT)
        assert status == 200 and body == b"y" * 60 + b"z" * 40 and headers["content-length"] == "100"
    assert running.rows[-1]["bytes_out"] == 100
    assert len(upstream.peers) == 2 and upstream.peers[0] == upstream.peers[1]  # released, reused


# --- large whole answers (relayed as they arrive) ---------------------------------------------------------------


@pytest.mark.parametrize("declared", [True, False])
async def test_large_whole_answer_is_relayed_with_its_usage(upstream, sidecar_factory, declared):
    body = big_body()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json", "x-up": "y"})
        if declared:
            resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), 200_000):
            await resp.write(body[i : i + 200_000])
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url)
    for _ in range(2):
        status, headers, got = await post(running.url + CHAT_PATH, CHAT)
        assert status == 200 and got == body and headers["x-up"] == "y"
        assert headers.get("content-length") == (str(len(body)) if declared else None)
    row = running.rows[-1]
    assert (row["outcome"], row["status"], row["upstream_status"], row["error_code"]) == ("completed", 200, 200, None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (7, 3, "upstream")
    assert row["bytes_out"] == len(body) and row["ttft_ms"] is not None
    assert upstream.peers[0] == upstream.peers[1]  # a complete answer: the connection went back to the pool


async def test_large_whole_500_is_an_upstream_error(upstream, sidecar_factory):
    body = big_body()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, body=body, content_type="application/json")

    upstream.handler = handler
    running = await sidecar_factory(upstream.url)
    status, _, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 500 and got == body
    row = running.rows[-1]
    assert (row["outcome"], row["error_code"], row["status"], row["usage_source"]) == (
        "upstream_error",
        "upstream_status",
        500,
        "none",
    )
    assert row["ttft_ms"] is None and row["bytes_out"] == len(body)


async def test_large_whole_answer_over_the_limit_is_cut_short(upstream, sidecar_factory):
    body = big_body()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 100_000):
            await resp.write(body[i : i + 100_000])
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, upstream__max_response_bytes=1_300_000)
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with aiohttp.ClientSession() as s, s.post(running.url + CHAT_PATH, json=CHAT) as r:
            assert r.status == 200
            async for part in r.content.iter_any():
                got += part
    assert body.startswith(got) and 1_048_576 < len(got) <= 1_300_000
    await wait_for(lambda: len(running.rows) == 1)
    row = running.rows[-1]
    assert (row["outcome"], row["error_code"], row["status"], row["upstream_status"]) == (
        "upstream_error",
        "upstream_dropped",
        200,
        200,
    )
    assert row["bytes_out"] == len(got)
    assert errors_line("dropped") in await metrics(running.url)


async def test_client_gone_during_a_large_whole_answer_is_charged_its_budget(upstream, sidecar_factory):
    body = big_body()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        await resp.prepare(request)
        await resp.write(body[:1_100_000])
        await release.wait()
        await resp.write(body[1_100_000:])
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url)
    reader, writer = await raw_request(running.port, {**CHAT, "max_tokens": 50})
    seen = 0
    while seen < 1_000_000:
        seen += len(await reader.read(65536))
    writer.transport.abort()
    await wait_for(lambda: upstream.cancelled == 1, 3)
    await wait_for(lambda: len(running.rows) == 1)
    release.set()
    row = running.rows[0]
    assert (row["outcome"], row["status"], row["error_code"]) == ("client_disconnected", 499, "client_disconnected")
    assert (row["completion_tokens"], row["usage_source"]) == (50, "counted") and row["prompt_tokens"] > 0


async def test_client_gone_before_a_whole_answer_is_charged_its_prompt(fake, sidecar):
    fake.script.delay_headers = 30
    _reader, writer = await raw_request(sidecar.port, {**CHAT, "max_tokens": 50})
    await wait_for(lambda: len(fake.received) == 1)
    writer.close()
    await wait_for(lambda: fake.last().closed_at is not None, 3)
    await wait_for(lambda: len(sidecar.rows) == 1)
    row = sidecar.rows[0]
    assert (row["outcome"], row["status"], row["error_code"]) == ("client_disconnected", 499, "client_disconnected")
    assert (row["completion_tokens"], row["usage_source"]) == (0, "counted") and row["prompt_tokens"] > 0
    assert row["upstream_status"] is None


# --- streams ----------------------------------------------------------------------------------------------------


async def test_stream_row_is_exact_and_connection_is_reused(fake, sidecar):
    fake.script.chunks, fake.script.cached_tokens = 3, 2
    body = {**STREAM, "stream_options": {"include_usage": True}}
    for _ in range(2):
        status, headers, data = await post(sidecar.url + CHAT_PATH, body)
        assert status == 200 and data == fake.sent[headers["x-request-id"]]
        assert headers["content-type"] == "text/event-stream" and headers["cache-control"] == "no-cache"
    row = sidecar.rows[-1]
    assert (row["outcome"], row["status"], row["upstream_status"], row["error_code"]) == ("completed", 200, 200, None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (11, 3, "upstream")
    assert row["cached_tokens"] == 2
    assert row["bytes_out"] == len(data) and row["chunks"] >= 1 and row["ttft_ms"] is not None
    assert [r.closed_at for r in fake.received] == [None, None]


async def test_stream_chunks_are_counted_one_by_one(fake, sidecar):
    fake.script.chunks, fake.script.delay_chunks = 3, 0.03
    _, headers, data = await post(sidecar.url + CHAT_PATH, {**STREAM, "stream_options": {"include_usage": True}})
    assert data == fake.sent[headers["x-request-id"]]
    row = sidecar.rows[-1]
    assert row["chunks"] == 7 and row["bytes_out"] == len(data)  # role, 3 tokens, finish, usage, [DONE]


async def test_stream_with_no_output_has_no_ttft(fake, sidecar):
    fake.script.chunks = 0
    _, _, data = await post(sidecar.url + CHAT_PATH, STREAM)
    assert data.endswith(b"data: [DONE]\n\n")
    row = sidecar.rows[-1]
    assert row["ttft_ms"] is None and row["outcome"] == "completed" and row["completion_tokens"] == 0


async def test_stream_tail_without_a_final_separator_is_relayed(upstream, sidecar_factory):
    events = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: [DONE]'

    upstream.handler = sse_answer(events)
    running = await sidecar_factory(upstream.url)
    status, _, data = await post(running.url + CHAT_PATH, {**STREAM, "stream_options": {"include_usage": True}})
    assert status == 200 and data == events
    row = running.rows[-1]
    assert row["bytes_out"] == len(events) and row["outcome"] == "completed"
    assert (row["completion_tokens"], row["usage_source"]) == (1, "counted") and row["prompt_tokens"] > 0


async def test_stream_500_is_passed_on_and_recorded(upstream, sidecar_factory):
    events = b'data: {"error":{"message":"boom"}}\n\n'

    upstream.handler = sse_answer(events, status=500)
    running = await sidecar_factory(upstream.url)
    status, headers, data = await post(running.url + CHAT_PATH, STREAM)
    assert status == 500 and data == events and headers["content-type"] == "text/event-stream"
    row = running.rows[-1]
    assert (row["outcome"], row["error_code"], row["status"], row["upstream_status"]) == (
        "upstream_error",
        "upstream_status",
        500,
        500,
    )
    assert errors_line("status_5xx") in await metrics(running.url)


async def test_stream_status_other_than_200_is_kept(upstream, sidecar_factory):
    events = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: [DONE]\n\n'

    upstream.handler = sse_answer(events, status=203, content_type="text/event-stream; charset=utf-8")
    running = await sidecar_factory(upstream.url)
    status, _, data = await post(running.url + CHAT_PATH, STREAM)
    assert status == 203 and data == events
    assert running.rows[-1]["status"] == 203 and running.rows[-1]["outcome"] == "completed"


async def test_drop_mid_stream_message_metric_and_closed(fake, sidecar):
    fake.script.chunks, fake.script.drop_after = 10, 3
    _, _, data = await post(sidecar.url + CHAT_PATH, STREAM)
    err = last_event_error(data)
    assert err["code"] == "upstream_dropped" and err["message"].startswith(
        "The upstream connection broke mid-response: "
    )
    assert len(err["message"]) > len("The upstream connection broke mid-response: ")
    row = sidecar.rows[-1]
    assert row["bytes_out"] == data.rindex(b"event: error") and row["ttft_ms"] is not None
    assert errors_line("dropped") in await metrics(sidecar.url)


async def test_idle_timeout_message_and_metric(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__stream_idle_timeout=0.2)
    fake.script.hang_after = 1
    _, _, data = await post(running.url + CHAT_PATH, STREAM)
    err = last_event_error(data)
    assert err["code"] == "upstream_timeout" and err["message"].startswith("The upstream did not answer in time (")
    assert "idle" in err["message"]
    assert running.rows[-1]["bytes_out"] == data.rindex(b"event: error")
    text = await metrics(running.url)
    assert errors_line("timeout_idle") in text and errors_line("timeout_first_byte", 0) in text
    await wait_for(lambda: fake.last().closed_at is not None, 2)


async def test_first_byte_timeout_metric(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__first_byte_timeout=0.2)
    fake.script.delay_headers = 3
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 504
    assert orjson.loads(body)["error"]["message"].startswith("The upstream did not answer in time (")
    assert errors_line("timeout_first_byte") in await metrics(running.url)


async def test_connect_failure_metric_and_message(sidecar_factory):
    running = await sidecar_factory(f"http://127.0.0.1:{free_port()}/v1")
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 502
    assert orjson.loads(body)["error"]["message"].startswith("Cannot connect to the upstream: ")
    assert errors_line("connect") in await metrics(running.url)
    row = running.rows[-1]
    assert row["upstream_status"] is None and row["error_code"] == "upstream_unreachable"


async def test_client_gone_mid_stream_row(fake, sidecar):
    fake.script.chunks, fake.script.delay_chunks = 100, 0.01
    reader, writer = await raw_request(sidecar.port, STREAM)
    seen = b""
    while seen.count(b"tok") < 3:
        seen += await reader.read(65536)
    writer.transport.abort()
    await wait_for(lambda: fake.last().closed_at is not None, 3)
    await wait_for(lambda: len(sidecar.rows) == 1)
    row = sidecar.rows[0]
    assert (row["outcome"], row["status"], row["error_code"]) == ("client_disconnected", 499, "client_disconnected")
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] >= 3 and row["usage_source"] == "counted"


# --- audit ------------------------------------------------------------------------------------------------------


def audit_records(path: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in sorted(glob.glob(f"{path}/audit-*.jsonl*")):
        with open(name, "rb") as f:
            out += [orjson.loads(line) for line in f if line.strip()]
    return out


async def audited(sidecar_factory: Any, url: str, tmp_path: Any, **options: Any) -> Any:
    return await sidecar_factory(
        url, audit__capture="all", audit__jsonl_dir=str(tmp_path / "audit"), writer__flush_interval_ms=10, **options
    )


async def test_audit_of_whole_stream_and_cut_stream(fake, sidecar_factory, tmp_path):
    running = await audited(sidecar_factory, fake.url, tmp_path)
    fake.script.chunks = 4
    _, _, whole = await post(running.url + CHAT_PATH, CHAT)
    await post(running.url + CHAT_PATH, {**STREAM, "stream_options": {"include_usage": True}})
    fake.script.drop_after = 2
    await post(running.url + CHAT_PATH, STREAM)
    fake.script.drop_after, fake.script.no_done = None, True
    await post(running.url + CHAT_PATH, STREAM)
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 4, 5)
    plain, streamed, cut, no_done = sorted(audit_records(tmp_path / "audit"), key=lambda r: r["timings"]["started_at"])
    assert plain["complete"] is True and plain["response"] == orjson.loads(whole)
    assert streamed["complete"] is True and streamed["usage"]["completion_tokens"] == 4
    assert streamed["response"]["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 "
    assert streamed["response"]["usage"]["completion_tokens"] == 4
    assert cut["complete"] is False and cut["outcome"] == "upstream_error"
    assert cut["response"]["choices"][0]["message"]["content"] == "tok0 tok1 "
    assert no_done["complete"] is False and no_done["outcome"] == "completed"


async def test_audit_of_a_large_whole_answer(upstream, sidecar_factory, tmp_path):
    body = big_body()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    upstream.handler = handler
    running = await audited(sidecar_factory, upstream.url, tmp_path, audit__max_payload_bytes=20_000)
    status, _, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and got == body
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 1, 5)
    (record,) = audit_records(tmp_path / "audit")
    assert record["complete"] is True and record["usage"]["completion_tokens"] == 3
    assert record["response"] is not None and len(orjson.dumps(record)) <= 20_000


async def test_audit_of_a_long_stream_folds(fake, sidecar_factory, tmp_path):
    running = await audited(sidecar_factory, fake.url, tmp_path)
    fake.script.chunks = 2500  # ~375 KB of events: over one fold
    _, _, data = await post(running.url + CHAT_PATH, STREAM)
    assert data.count(b"tok") == 2500
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 1, 5)
    (record,) = audit_records(tmp_path / "audit")
    content = record["response"]["choices"][0]["message"]["content"]
    text = content if isinstance(content, str) else content["prefix"]
    assert text.startswith("tok0 tok1 tok2 ") and record["usage"]["completion_tokens"] == 2500


# --- capacity and shutdown --------------------------------------------------------------------------------------


async def test_no_upstream_connection_free_is_a_503_with_retry_after(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__max_connections=1, limits__queue_timeout=0.1)
    fake.script.delay_headers = 0.4
    first = asyncio.create_task(post(running.url + CHAT_PATH, CHAT))
    await wait_for(lambda: len(fake.received) == 1)
    status, headers, body = await post(running.url + CHAT_PATH, CHAT)
    err = orjson.loads(body)["error"]
    assert status == 503 and headers["retry-after"] == "1" and err["code"] == "server_overloaded"
    assert err["message"].startswith("The server is at capacity (") and err["message"].endswith("retry shortly.")
    assert (await first)[0] == 200


async def test_shutdown_mid_stream_ends_it_with_an_error_event(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__drain_timeout=0.2)
    fake.script.chunks, fake.script.delay_chunks = 100, 0.02
    async with aiohttp.ClientSession() as s, s.post(running.url + CHAT_PATH, json=STREAM) as r:
        first = await r.content.readuntil(b"tok1 ")
        drain = asyncio.create_task(running.server.drain())
        data = first + await r.read()
        assert r.status == 200
    await drain
    err = last_event_error(data)
    assert err["code"] == "server_shutting_down" and b"[DONE]" not in data
    assert err["message"] == "The server is shutting down; retry the request."
    row = running.rows[-1]
    assert (row["outcome"], row["status"], row["error_code"]) == ("shutdown", 200, "server_shutting_down")
    assert row["usage_source"] == "counted" and row["completion_tokens"] >= 2
    await wait_for(lambda: fake.last().closed_at is not None, 2)


async def test_shutdown_while_waiting_for_a_whole_answer_is_a_503(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__drain_timeout=0.2)
    fake.script.delay_headers = 3
    task = asyncio.create_task(post(running.url + CHAT_PATH, CHAT))
    await wait_for(lambda: len(fake.received) == 1)
    await running.server.drain()
    status, _, body = await task
    assert status == 503 and orjson.loads(body)["error"]["code"] == "server_shutting_down"
    row = running.rows[-1]
    assert (row["outcome"], row["status"], row["error_code"]) == ("shutdown", 503, "server_shutting_down")


# --- more of the contract: boundaries, usage shapes, token refunds, shutdown paths, stuck clients ---------------

ADMIN = "relay-admin-token"


def json_answer(doc: dict[str, Any], status: int = 200) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")

    return handler


async def test_declared_length_exactly_at_the_limit_is_sent(upstream, sidecar_factory):
    upstream.handler = json_answer({"id": "x", "pad": "p" * 50})
    size = len(orjson.dumps({"id": "x", "pad": "p" * 50}))
    running = await sidecar_factory(upstream.url, upstream__max_response_bytes=size)
    status, headers, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and len(body) == size and headers["content-length"] == str(size)


async def test_a_chunked_answer_of_exactly_buffered_bytes_is_sent_whole(upstream, sidecar_factory):
    from sidecar.relay import BUFFERED

    body = big_body(BUFFERED)
    upstream.handler = paced_body([body[:600_000], body[600_000:]], 0.0)
    running = await sidecar_factory(upstream.url)
    status, headers, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and got == body and headers["content-length"] == str(BUFFERED)  # one write, not chunked


async def test_a_relayed_answer_exactly_at_the_limit_is_sent(upstream, sidecar_factory):
    body = big_body()
    upstream.handler = paced_body([body[i : i + 300_000] for i in range(0, len(body), 300_000)], 0.0)
    running = await sidecar_factory(upstream.url, upstream__max_response_bytes=len(body))
    status, _, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and got == body and running.rows[-1]["outcome"] == "completed"


async def test_a_relayed_answer_has_the_idle_limit_between_chunks_not_the_first_byte_one(upstream, sidecar_factory):
    """Pauses longer than first_byte_timeout but shorter than stream_idle_timeout: the answer completes."""
    body = big_body()
    upstream.handler = paced_body([body[:1_100_000], body[1_100_000:1_300_000], body[1_300_000:]], 0.5)
    running = await sidecar_factory(upstream.url, upstream__first_byte_timeout=0.3, upstream__stream_idle_timeout=2)
    status, _, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and got == body and running.rows[-1]["outcome"] == "completed"


async def test_a_relayed_answer_that_stalls_past_the_idle_limit_is_cut(upstream, sidecar_factory):
    body = big_body()
    upstream.handler = paced_body([body[:1_100_000], body[1_100_000:]], 1.5)
    running = await sidecar_factory(upstream.url, upstream__stream_idle_timeout=0.3)
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with aiohttp.ClientSession() as s, s.post(running.url + CHAT_PATH, json=CHAT) as r:
            async for part in r.content.iter_any():
                got += part
    assert body.startswith(got) and len(got) < len(body)
    await wait_for(lambda: len(running.rows) == 1)
    row = running.rows[0]
    assert (row["outcome"], row["error_code"], row["status"]) == ("upstream_timeout", "upstream_timeout", 200)
    assert errors_line("timeout_idle") in await metrics(running.url)


async def test_shutdown_mid_relayed_answer_cuts_it(upstream, sidecar_factory):
    body = big_body()
    upstream.handler = paced_body([body[:1_100_000], body[1_100_000:]], 3)
    running = await sidecar_factory(upstream.url, server__drain_timeout=0.2)
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with aiohttp.ClientSession() as s, s.post(running.url + CHAT_PATH, json=CHAT) as r:
            while len(got) < 1_000_000:
                got += await r.content.read(65536)
            drain = asyncio.create_task(running.server.drain())
            async for part in r.content.iter_any():
                got += part
    await drain
    assert body.startswith(got) and len(got) < len(body)
    row = running.rows[-1]
    assert (row["outcome"], row["error_code"], row["status"]) == ("shutdown", "server_shutting_down", 200)


async def test_a_3xx_whole_answer_is_passed_on_without_usage(upstream, sidecar_factory):
    doc = {"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    upstream.handler = json_answer(doc, status=300)
    running = await sidecar_factory(upstream.url)
    status, _, body = await post(running.url + CHAT_PATH, CHAT)
    assert status == 300 and orjson.loads(body) == doc
    row = running.rows[-1]
    assert (row["status"], row["usage_source"], row["completion_tokens"], row["ttft_ms"]) == (300, "none", None, None)


@pytest.mark.parametrize(
    ("path", "usage", "expected"),
    [
        ("/v1/embeddings", {"prompt_tokens": 4}, (4, 0)),  # nothing generated: no output is zero output
        ("/v1/embeddings", {"prompt_tokens": 4, "completion_tokens": 2}, (4, 2)),  # the upstream's word wins
        (CHAT_PATH, {"prompt_tokens": 4}, (4, None)),  # a chat answer that does not say: unknown, not zero
    ],
)
async def test_usage_without_output_tokens(upstream, sidecar_factory, path, usage, expected):
    upstream.handler = json_answer({"object": "x", "usage": usage})
    running = await sidecar_factory(upstream.url)
    body = {"model": "m", "input": "a"} if "embeddings" in path else CHAT
    status, _, _ = await post(running.url + path, body)
    row = running.rows[-1]
    assert status == 200 and (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (
        *expected,
        "upstream",
    )


async def test_a_whole_answer_keeps_its_cached_tokens(fake, sidecar):
    fake.script.cached_tokens = 6
    await post(sidecar.url + CHAT_PATH, CHAT)
    row = sidecar.rows[-1]
    assert (row["prompt_tokens"], row["cached_tokens"], row["usage_source"]) == (11, 6, "upstream")


async def make_key(url: str, **fields: Any) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/admin/keys", json={"name": "t", **fields}, headers={"authorization": f"Bearer {ADMIN}"}) as r,
    ):
        assert r.status == 201
        key: str = (await r.json())["key"]
        return key


async def test_token_refunds_count_prompt_and_output_on_whole_and_streamed_answers(fake, sidecar_factory):
    """tpm=600 refills 10 tokens a second. Each answer uses 11 prompt + 5 output tokens; once it has ended, its
    reservation is settled to that, as the next answer's x-ratelimit-remaining-tokens shows."""
    from sidecar.wire.tokens import estimate_prompt

    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)
    key = await make_key(running.url, rpm=100000, tpm=600)
    auth = {"authorization": f"Bearer {key}"}
    fake.script.chunks = 5
    whole = {**CHAT, "max_tokens": 50}
    reservation = estimate_prompt(whole) + 50

    async def remaining(body: dict[str, Any]) -> int:
        status, headers, _ = await post(running.url + CHAT_PATH, body, auth)
        assert status == 200
        return int(headers["x-ratelimit-remaining-tokens"])

    assert 600 - reservation <= await remaining(whole) <= 600 - reservation + 3
    assert 600 - 16 - reservation <= await remaining(whole) <= 600 - 16 - reservation + 3
    await remaining({**STREAM, "max_tokens": 50, "stream_options": {"include_usage": True}})
    assert 600 - 48 - reservation <= await remaining(whole) <= 600 - 48 - reservation + 5


async def test_tool_call_arguments_are_counted_when_the_request_declared_tools(upstream, sidecar_factory):
    def event(delta: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n"

    call = {"index": 0, "function": {"arguments": "{}"}}
    events = event({"role": "assistant"}) + b"".join(event({"tool_calls": [call]}) for _ in range(4))

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(events + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, _, data = await post(running.url + CHAT_PATH, {**STREAM, "tools": tools})
    assert status == 200 and data == events + b"data: [DONE]\n\n"
    row = running.rows[-1]
    assert (row["completion_tokens"], row["usage_source"]) == (4, "counted")


async def test_a_stream_tail_is_relayed_when_the_usage_we_asked_for_is_hidden(upstream, sidecar_factory):
    events = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: [DONE]'

    upstream.handler = sse_answer(events)
    running = await sidecar_factory(upstream.url)
    status, _, data = await post(running.url + CHAT_PATH, STREAM)  # no include_usage: the sidecar asks, hides
    assert status == 200 and data == events
    assert running.rows[-1]["bytes_out"] == len(events)


async def test_a_finished_stream_returns_its_connection_and_a_cut_one_closes_it(upstream, sidecar_factory):
    gate = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n')
        if request.query.get("hold"):
            await gate.wait()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url)
    for _ in range(2):
        assert (await post(running.url + CHAT_PATH, STREAM))[0] == 200
    assert upstream.peers[0] == upstream.peers[1]  # released to the pool, reused
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + CHAT_PATH + "?hold=1", json=STREAM) as r:
            await r.content.readuntil(b"\n\n")
        await wait_for(lambda: upstream.cancelled == 1, 3)  # the cut stream's connection was closed
        gate.set()
        assert (await post(running.url + CHAT_PATH, STREAM))[0] == 200
    assert upstream.peers[3] != upstream.peers[2]


async def test_an_invalid_upstream_answer_is_a_502_with_the_protocol_metric(sidecar_factory):
    done = asyncio.Event()

    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await reader.read()  # until the sidecar closes a connection it cannot use
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(bad, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{port}/v1")
        status, _, body = await post(running.url + CHAT_PATH, CHAT)
        message = orjson.loads(body)["error"]["message"]
        assert status == 502 and message.startswith("The upstream request failed: invalid response from the upstream")
        assert errors_line("protocol") in await metrics(running.url)
        await asyncio.wait_for(done.wait(), 3)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_dropped_stream_says_what_broke(fake, sidecar):
    fake.script.chunks, fake.script.drop_after = 10, 3
    _, _, data = await post(sidecar.url + CHAT_PATH, STREAM)
    message = last_event_error(data)["message"]
    assert re.fullmatch(r"The upstream connection broke mid-response: .*(clos|reset|broke|EOF|lost).*", message, re.I)
    assert not message.endswith("None")


async def test_a_client_that_stops_reading_is_cut_at_the_idle_limit_and_recorded_as_a_timeout(
    upstream, sidecar_factory
):
    """The client reads nothing; the sidecar's write waits on it past stream_idle_timeout: the stream is cut,
    the row says timeout (it said `shutdown`, status 200, before: aiohttp hands back the drain waiter the
    deadline cancelled), the lease is released, and the upstream connection closed."""
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 60_000 + b'"}}]}\n\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(200):  # 12 MB: more than every socket buffer between here and the client
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    upstream.handler = handler
    running = await sidecar_factory(upstream.url, upstream__stream_idle_timeout=0.3)
    reader, writer = await raw_request(running.port, STREAM, rcvbuf=4096)
    await wait_for(lambda: len(running.rows) == 1, 5)
    row = running.rows[0]
    assert (row["outcome"], row["error_code"], row["status"]) == ("upstream_timeout", "upstream_timeout", 200)
    assert 0 < row["bytes_out"] < 200 * len(chunk)
    await wait_for(lambda: upstream.cancelled == 1, 3)
    got = b""
    while part := await reader.read(1 << 20):  # what was in flight, then the end: the sidecar closed it
        got += part
    assert b"[DONE]" not in got
    writer.close()


async def test_shutdown_with_the_client_already_gone_records_a_disconnect(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__drain_timeout=0.1)
    fake.script.chunks, fake.script.delay_chunks = 5, 2
    reader, writer = await raw_request(running.port, STREAM)
    seen = b""
    while b"tok0" not in seen:
        seen += await reader.read(65536)
    writer.transport.abort()
    await asyncio.sleep(0.2)  # the sidecar waits on the upstream: it notices the client only now
    await running.server.drain()
    row = running.rows[-1]
    assert (row["outcome"], row["error_code"]) == ("client_disconnected", "client_disconnected")


async def test_shutdown_while_queued_for_admission_is_a_503(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__drain_timeout=0.2, limits__global_concurrency=1)
    fake.script.chunks, fake.script.delay_chunks = 50, 0.05
    first = asyncio.create_task(post(running.url + CHAT_PATH, STREAM))
    await wait_for(lambda: len(fake.received) == 1)
    second = asyncio.create_task(post(running.url + CHAT_PATH, CHAT))
    await asyncio.sleep(0.1)
    await running.server.drain()
    await first
    status, _, body = await second
    assert status == 503 and orjson.loads(body)["error"]["code"] == "server_shutting_down"
    queued = next(r for r in running.rows if not r["stream"])
    assert (queued["outcome"], queued["status"], queued["error_code"]) == ("shutdown", 503, "server_shutting_down")


async def test_requests_without_a_verified_key_cost_a_row_only_within_the_reject_rate(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, server__reject_rows_per_minute=1
    )
    key = await make_key(running.url)
    for _ in range(4):
        assert (await post(running.url + CHAT_PATH, CHAT, {"authorization": "Bearer sk-sc-wrong"}))[0] == 401
    for _ in range(3):
        assert (await post(running.url + CHAT_PATH, CHAT, {"authorization": f"Bearer {key}"}))[0] == 200
    outcomes = [r["outcome"] for r in running.rows]
    assert outcomes.count("unauthorized") == 1 and outcomes.count("completed") == 3  # every verified one kept


async def test_the_audit_record_of_a_request_that_got_no_answer_has_no_response(fake, sidecar_factory, tmp_path):
    running = await audited(sidecar_factory, fake.url, tmp_path, upstream__first_byte_timeout=0.2)
    fake.script.delay_headers = 3
    assert (await post(running.url + CHAT_PATH, CHAT))[0] == 504
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 1, 5)
    (record,) = audit_records(tmp_path / "audit")
    assert record["response"] is None and record["complete"] is False and record["outcome"] == "upstream_timeout"


@pytest.mark.parametrize("size", [50_000, BIG])  # read whole / relayed as it arrives
async def test_with_redact_paths_an_audited_answer_over_the_cap_keeps_only_its_digest(
    upstream, sidecar_factory, tmp_path, size
):
    body = big_body(size)
    upstream.handler = json_answer(orjson.loads(body))
    running = await audited(
        sidecar_factory,
        upstream.url,
        tmp_path,
        audit__max_payload_bytes=20_000,
        audit__redact_paths=["choices[*].message.content"],
    )
    status, _, got = await post(running.url + CHAT_PATH, CHAT)
    assert status == 200 and orjson.loads(got) == orjson.loads(body)
    await wait_for(lambda: len(audit_records(tmp_path / "audit")) == 1, 5)
    response = audit_records(tmp_path / "audit")[0]["response"]
    assert response["truncated"] is True and response["length"] == len(got) and "prefix" not in response


async def test_a_large_answer_on_a_native_route_keeps_the_usage_object_it_carries(upstream, sidecar_factory):
    body = big_body()
    upstream.handler = paced_body([body[i : i + 400_000] for i in range(0, len(body), 400_000)], 0.0)
    running = await sidecar_factory(upstream.url, upstream__kind="llama.cpp")
    status, _, got = await post(running.url + "/completion", {"prompt": "hi"})
    assert status == 200 and got == body
    row = running.rows[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (7, 3, "upstream")


def send_fin(writer: asyncio.StreamWriter) -> None:
    """The client's FIN, sent now (not at the loop's next turn, as `close()` would): through a duplicate of the
    socket's descriptor, since uvloop's transport socket has no `shutdown`."""
    dup = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    dup.shutdown(socket.SHUT_WR)
    dup.close()


async def test_a_client_that_leaves_just_before_the_terminating_chunk_keeps_its_completed_row(
    upstream, sidecar, caplog
):
    """The client reads to the last event and closes before the stream's terminating chunk is written: the race
    of a benchmark whose clients close at the end of each round. The upstream ends its answer and the client's
    socket closes in the same turn of the loop, so the sidecar sees the upstream's end first. Its row is made
    then, before that last write (so a process killed in between never leaves an answer without a row): the
    client read every event to `[DONE]`, and the row says completed. The write to the closed connection is
    no handler error and changes nothing."""
    end = asyncio.Event()
    clients: list[asyncio.StreamWriter] = []
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"tok1 "}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path != CHAT_PATH:  # the model list the metrics page asks for
            return web.json_response({"object": "list", "data": []})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(events))
        await end.wait()
        await resp.write_eof()  # the terminating chunk is on its way to the sidecar...
        send_fin(clients[0])  # ...and, in the same turn of the loop, the client's connection closes
        return resp

    upstream.handler = handler
    reader, writer = await raw_request(sidecar.port, STREAM)
    clients.append(writer)
    seen = b""
    while b"[DONE]" not in seen:
        seen += await reader.read(65536)
    end.set()
    await wait_for(lambda: len(sidecar.rows) == 1)
    row = sidecar.rows[0]
    assert (row["outcome"], row["status"], row["error_code"]) == ("completed", 200, None)
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (7, 1, "upstream")
    assert "sidecar_client_disconnects_total{" not in await metrics(sidecar.url)
    assert sidecar.catcher.tracebacks == [] and "request failed" not in sidecar.log_text()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    writer.close()
