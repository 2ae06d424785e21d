"""The upstream connection pool's corners, through the sidecar, against raw asyncio upstreams that answer in odd ways:
a body delimited by the connection's close, 1xx heads before the real one, garbage, the pool's size limit and
its idle timeout, and a fast upstream feeding a slow client (reading pauses instead of buffering everything).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from sidecar.app import UPSTREAM
from tests.support.bodies import CHAT_PATH
from tests.support.clients import post
from tests.support.fake_upstream import Script

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
CHUNKS = 2048  # of 64 KiB: 128 MiB, more than the kernel's socket buffers can hold
ANSWER = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [], "usage": {"total_tokens": 1}})


def json_answer(extra_headers: bytes = b"") -> bytes:
    """A whole 200 answer carrying ANSWER, as raw bytes on the wire."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra_headers
    return head + b"Content-Length: %d\r\n\r\n" % len(ANSWER) + ANSWER


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"), 0
    )
    return await reader.readexactly(length)


async def chat(url: str) -> tuple[int, bytes]:
    status, _, body = await post(url + CHAT_PATH, BODY, {"content-type": "application/json"})
    return status, body


async def test_a_body_delimited_by_the_connections_close(sidecar_factory):
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + ANSWER)
        await writer.drain()
        writer.close()

    server, url = await serve(handler)
    try:
        running = await sidecar_factory(url)
        assert await chat(running.url) == (200, ANSWER)
        assert running.rows[0]["outcome"] == "completed"
    finally:
        server.close()


def answer_once(raw: bytes) -> Handler:
    """An upstream that reads one request, writes `raw` as its answer, and waits for the sidecar to hang up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()
        await reader.read()
        writer.close()

    return handler


async def post_through(sidecar_factory: Any, raw: bytes) -> tuple[int, bytes]:
    server, url = await serve(answer_once(raw))
    try:
        running = await sidecar_factory(url)
        return await chat(running.url)
    finally:
        server.close()


async def test_informational_heads_before_the_answer_are_skipped(sidecar_factory):
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + json_answer()
    assert await post_through(sidecar_factory, raw) == (200, ANSWER)


async def test_a_garbled_response_is_a_502(sidecar_factory):
    status, body = await post_through(sidecar_factory, b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\nxx")
    assert status == 502
    assert orjson.loads(body)["error"]["type"] == "upstream_error"


async def test_the_pool_size_is_an_idle_cap_not_a_concurrency_limit(fake, sidecar_factory):
    fake.script = Script(delay_headers=0.2)
    running = await sidecar_factory(fake.url, upstream__pool_size=3)
    results = await asyncio.gather(*(chat(running.url) for _ in range(20)))
    assert [s for s, _ in results] == [200] * 20
    assert fake.max_in_flight == 20  # every admitted request ran at once
    pool = running.server.app[UPSTREAM].pool
    assert pool.idle_connections == 3 and pool.open_connections == 3  # the rest were closed, not kept


async def test_max_connections_caps_open_connections_and_measures_the_wait(fake, sidecar_factory):
    fake.script = Script(delay_headers=0.05)
    running = await sidecar_factory(fake.url, upstream__max_connections=3)
    results = await asyncio.gather(*(chat(running.url) for _ in range(20)))
    assert [s for s, _ in results] == [200] * 20
    assert fake.max_in_flight == 3
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        text = await r.text()
    waited = next(
        line for line in text.splitlines() if line.startswith("sidecar_upstream_connection_wait_seconds_count")
    )
    assert float(waited.split()[-1]) >= 17  # all but the first three waited, and each wait was measured


async def test_a_full_connection_queue_is_a_503_not_an_unbounded_wait(fake, sidecar_factory):
    fake.script = Script(delay_headers=0.3)
    running = await sidecar_factory(fake.url, upstream__max_connections=1, limits__queue_size=2)
    results = await asyncio.gather(*(chat(running.url) for _ in range(10)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= 3 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}
    assert fake.max_in_flight == 1


async def test_idle_connections_older_than_the_keepalive_timeout_are_not_reused(sidecar_factory):
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await read_request(reader)
                writer.write(json_answer())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server, url = await serve(handler)
    try:
        running = await sidecar_factory(url, upstream__keepalive_timeout=0.3)
        for _ in range(3):
            assert (await chat(running.url))[0] == 200
        assert connections == 1  # kept alive between quick requests
        await asyncio.sleep(0.5)
        assert (await chat(running.url))[0] == 200
        assert connections == 2  # past the idle timeout: a new connection
    finally:
        server.close()


async def test_a_fast_upstream_and_a_slow_client_pause_instead_of_buffering(sidecar_factory):
    """A 128 MiB stream and a client that stops reading: the upstream is held back (its sending stops), because
    the sidecar pauses reading instead of buffering. Kernel socket buffers on loopback can hold tens of MiB
    (tcp_rmem up to 32 MiB here), so what is checked is that sending stops, well before the end."""
    sent = 0
    chunk = b"data: " + b"x" * 65530 + b"\n\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(CHUNKS):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server, url = await serve(handler)
    try:
        running = await sidecar_factory(url)
        async with aiohttp.ClientSession() as s:
            async with s.post(running.url + "/v1/chat/completions", data=BODY[:-1] + b',"stream":true}') as r:
                assert r.status == 200
                got = len(await r.content.read(65536))
                await asyncio.sleep(1.0)  # the client stalls: everything upstream of it should stall too
                stalled = sent
                await asyncio.sleep(0.5)
                assert sent == stalled < CHUNKS * len(chunk), f"the upstream kept sending: {stalled} -> {sent}"
                while data := await r.content.read(1 << 20):
                    got += len(data)
        assert got == sent == CHUNKS * len(chunk)
    finally:
        server.close()


async def test_a_response_header_beyond_ascii_does_not_break_the_answer(sidecar_factory):
    raw = json_answer(b"X-Note: caf\xe9 \xff\r\n")
    assert await post_through(sidecar_factory, raw) == (200, ANSWER)


async def test_bytes_after_a_complete_answer_retire_the_connection(sidecar_factory):
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(json_answer() + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")  # an answer nobody asked for
        await writer.drain()
        await reader.read()
        writer.close()

    server, url = await serve(handler)
    try:
        running = await sidecar_factory(url)
        assert await chat(running.url) == (200, ANSWER)
        assert await chat(running.url) == (200, ANSWER)
        assert connections == 2  # the first connection was not trusted with the second request
    finally:
        server.close()
