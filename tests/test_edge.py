"""The HTTP edge's deadlines over raw sockets: slow heads (slowloris), slow bodies, idle keep-alive connections.

The limits are set to fractions of a second so the tests are quick; what is asserted is the behaviour (a 408
or a silent close, the connection closed, nothing sent upstream, one `bad_request` row), with generous margins
on when it happens so a busy machine does not fail them.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.support.fake_upstream import Script

H = b"Host: x\r\n"
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
FULL = CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (fails if it does not within `timeout`)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(pause)
    except ConnectionError:
        pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split()[1])
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    return status, await reader.readexactly(length)


async def test_slowloris_head_gets_408_and_close_within_the_header_timeout(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    loop = asyncio.get_running_loop()
    start = loop.time()
    sender = asyncio.create_task(trickle(writer, FULL, 0.05))  # would need ~10 s to send it all
    answer = await read_all(reader)
    took = loop.time() - start
    sender.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code":"request_timeout"' in answer
    assert 0.4 < took < 3.0
    assert fake.received == []


async def test_idle_new_connection_is_closed_silently_at_the_header_timeout(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__header_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    assert await read_all(reader) == b""
    writer.close()


async def test_next_head_on_a_kept_alive_connection_is_on_the_clock_too(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__header_timeout=0.5, server__keepalive_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(FULL)
    status, _ = await read_response(reader)
    assert status == 200
    await asyncio.sleep(0.7)  # idle past the header timeout: keep-alive governs idleness, not the head clock
    sender = asyncio.create_task(trickle(writer, FULL, 0.05))
    answer = await read_all(reader)
    sender.cancel()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert len(fake.received) == 1


async def test_a_request_slower_than_the_header_timeout_is_not_cut(fake, sidecar_factory):
    """The head clock stops when the head is in: a long generation on a kept-alive connection is untouched."""
    fake.script = Script(chunks=1, delay_chunks=0.15)  # ~0.75 s a stream
    running = await sidecar_factory(fake.url, server__header_timeout=0.3, server__body_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    stream = BODY[:-1] + b',"stream":true}'
    for _ in range(2):
        writer.write(CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(stream) + stream)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
        assert b"[DONE]" in body
    writer.close()
    assert [r["outcome"] for r in await running.stored(2)] == ["completed", "completed"]


async def test_slow_body_gets_408_json_a_row_and_a_close(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__body_timeout=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY[:5])
    status, body = await read_response(reader)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert await read_all(reader) == b""  # closed: the rest of that body cannot be told from a next request
    writer.close()
    assert fake.received == []
    [row] = await running.stored(1)
    assert (row["status"], row["outcome"], row["error_code"]) == (408, "bad_request", "request_timeout")


async def test_slow_chunked_body_gets_408(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__body_timeout=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5] + b"\r\n")
    sender = asyncio.create_task(trickle(writer, b"%x\r\n" % (len(BODY) - 5) + BODY[5:] + b"\r\n0\r\n\r\n", 0.1))
    status, _ = await read_response(reader)
    sender.cancel()
    writer.close()
    assert status == 408
    assert fake.received == []


async def test_a_body_that_arrives_within_the_deadline_is_relayed(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__body_timeout=5)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(CHAT_HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY))
    await trickle(writer, BODY, 0.005)
    status, _ = await read_response(reader)
    writer.close()
    assert status == 200
    assert fake.last().body == BODY
    assert running.rows[0]["outcome"] == "completed"


async def test_idle_keep_alive_connection_closes_at_the_keepalive_timeout(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__keepalive_timeout=0.3, server__header_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(FULL)
    status, _ = await read_response(reader)
    assert status == 200
    assert await read_all(reader, 5) == b""
    writer.close()


async def test_the_aiohttp_internals_the_edge_relies_on_are_there_and_checked(fake, sidecar_factory):
    """Run at every start too: an aiohttp upgrade that moves them fails loudly, naming what is gone."""
    import aiohttp

    from sidecar.edge import AiohttpInternals, EdgeServer

    running = await sidecar_factory(fake.url)
    server = running.server.runner.server
    assert isinstance(server, EdgeServer)
    AiohttpInternals.check(server(), server)
    with pytest.raises(RuntimeError) as raised:
        AiohttpInternals.check(object(), server)
    assert "RequestHandler._messages" in str(raised.value) and aiohttp.__version__ in str(raised.value)
