"""A stream's relay loop over real sockets: the bytes a client gets and the row's `bytes_out` when events go to the
client's transport directly (after the first write), when that transport is paused by a client that reads slowly,
when the client speaks HTTP/1.0 (no chunked framing), and when the upstream's whole body is in before the relay
reads it (the rest goes out with the end of the answer)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tests.support.bodies import CHAT_PATH, STREAM
from tests.support.clients import post
from tests.support.waits import wait_for

USAGE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%d,"total_tokens":%d}}\n\n'  # noqa: E501


def token_event(i: int, pad: int = 0) -> bytes:
    text = f"t{i}" + "x" * pad
    return b"data: " + orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"


def stream_of(n: int, pad: int = 0) -> list[bytes]:
    """`n` token events, the usage event and `[DONE]`, one part each."""
    return [*(token_event(i, pad) for i in range(n)), USAGE % (n, n + 7), b"data: [DONE]\n\n"]


def sse_parts(parts: list[bytes], written: list[int]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An upstream handler that writes `parts` one write each, as fast as the sidecar takes them (`written`
    counts the parts written)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            written.append(len(part))
        await resp.write_eof()
        return resp

    return handler


def dechunk(body: bytes) -> bytes:
    out, at = [], 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol], 16)
        if size == 0:
            assert body[eol:] == b"\r\n\r\n"
            return b"".join(out)
        out.append(body[eol + 2 : eol + 2 + size])
        assert body[eol + 2 + size : eol + 4 + size] == b"\r\n"
        at = eol + 4 + size


async def request_on(port: int, body: dict[str, Any], version: str = "1.1") -> tuple[Any, Any]:
    """A raw client with a small receive buffer, that sends one request and reads nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
    payload = orjson.dumps(body)
    writer.write(
        f"POST {CHAT_PATH} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return reader, writer


async def test_a_client_that_stops_reading_gets_every_event_once_it_reads(fake, sidecar_factory):
    """12 MB of events (more than the kernel's socket buffers hold) against a client that reads nothing for a
    while: the client's transport is paused and the relay waits for it; then every byte arrives, in order, and is
    counted once."""
    parts, written = stream_of(3000, pad=4000), []
    fake.handler = sse_parts(parts, written)
    running = await sidecar_factory(fake.url)
    reader, writer = await request_on(running.port, {**STREAM, "stream_options": {"include_usage": True}})
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    await wait_for(lambda: len(written) > 10)
    await asyncio.sleep(0.3)  # no reading: the buffers between the upstream and this client fill
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # then read fast
    raw = b""
    while not raw.endswith(b"\r\n0\r\n\r\n"):
        raw += await reader.read(1 << 20)
    body = dechunk(raw)
    writer.close()
    assert body == b"".join(parts)
    row = (await running.stored(1))[-1]
    assert (row["outcome"], row["completion_tokens"], row["bytes_out"]) == ("completed", 3000, len(body))


async def test_an_http10_client_gets_the_stream_unframed(fake, sidecar_factory):
    parts = stream_of(20)
    fake.handler = sse_parts(parts, [])
    running = await sidecar_factory(fake.url)
    reader, writer = await request_on(running.port, {**STREAM, "stream_options": {"include_usage": True}}, "1.0")
    answer = await reader.read()  # HTTP/1.0: the answer ends with the connection
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"transfer-encoding" not in head.lower()
    assert body == b"".join(parts)
    row = (await running.stored(1))[-1]
    assert (row["outcome"], row["completion_tokens"], row["bytes_out"]) == ("completed", 20, len(body))


async def test_a_stream_all_in_at_once_hides_the_usage_asked_for_and_ends(fake, sidecar_factory):
    """The upstream's whole body in one write (it has ended before the relay reads it): the events go out with
    the end of the answer, without the usage event the sidecar asked for on the client's behalf."""
    parts = stream_of(5)
    fake.handler = sse_parts([b"".join(parts)], [])
    running = await sidecar_factory(fake.url)
    status, _, data = await post(running.url + CHAT_PATH, STREAM)
    assert status == 200 and data == b"".join(p for p in parts if b'"usage"' not in p)
    row = (await running.stored(1))[-1]
    assert (row["outcome"], row["prompt_tokens"], row["completion_tokens"]) == ("completed", 7, 5)
    assert row["bytes_out"] == len(data) and row["usage_source"] == "upstream"


async def test_events_after_the_first_write_are_relayed_as_they_come(fake, sidecar_factory):
    """Paced events: each reaches the client before the next is sent (the relay holds nothing back while the
    upstream's body is still coming)."""
    parts, sent = stream_of(4), asyncio.Event()
    got: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await wait_for(lambda: b"".join(got).endswith(part), why=lambda: f"{part!r} not relayed")
        sent.set()
        await resp.write_eof()
        return resp

    fake.handler = handler
    running = await sidecar_factory(fake.url)
    reader, writer = await request_on(running.port, {**STREAM, "stream_options": {"include_usage": True}})
    await reader.readuntil(b"\r\n\r\n")
    raw = b""
    while not raw.endswith(b"0\r\n\r\n"):
        raw += await reader.read(65536)
        try:
            got[:] = [dechunk(raw + (b"" if raw.endswith(b"0\r\n\r\n") else b"0\r\n\r\n"))]
        except (ValueError, AssertionError):
            continue  # a chunk cut in the middle: read on
    writer.close()
    assert sent.is_set() and dechunk(raw) == b"".join(parts)
