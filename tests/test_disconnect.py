"""Client disconnects over raw sockets: the upstream request must be closed within one second."""

from __future__ import annotations

import asyncio
import time

from tests.support.bodies import STREAM
from tests.support.clients import open_stream
from tests.support.waits import wait_for

CHAT = STREAM  # these tests stream


async def read_tokens(reader: asyncio.StreamReader, n: int) -> None:
    """Read the relayed stream until `n` content tokens have arrived."""
    seen = b""
    while seen.count(b"tok") < n:
        seen += await reader.read(65536)


async def test_disconnect_while_waiting_for_first_byte_closes_upstream(fake, sidecar):
    fake.script.delay_headers = 30
    _, writer = await open_stream(sidecar.port, CHAT)
    await wait_for(lambda: len(fake.received) == 1)
    closed = time.monotonic()
    writer.close()
    await wait_for(lambda: fake.last().closed_at is not None, 3)
    assert fake.last().closed_at - closed < 1.0
    await wait_for(lambda: len(sidecar.rows) == 1)
    row = sidecar.rows[0]
    assert (row["outcome"], row["status"]) == ("client_disconnected", 499)


async def test_disconnect_mid_stream_closes_upstream_and_counts_partial_usage(fake, sidecar):
    fake.script.chunks, fake.script.delay_chunks = 200, 0.02
    reader, writer = await open_stream(sidecar.port, CHAT)
    await read_tokens(reader, 5)
    closed = time.monotonic()
    writer.transport.abort()
    await wait_for(lambda: fake.last().closed_at is not None, 3)
    assert fake.last().closed_at - closed < 1.0
    await wait_for(lambda: len(sidecar.rows) == 1)
    row = sidecar.rows[0]
    assert (row["outcome"], row["status"], row["usage_source"]) == ("client_disconnected", 499, "counted")
    assert 5 <= row["completion_tokens"] < 200


async def test_disconnect_while_upstream_is_silent_mid_stream(fake, sidecar):
    fake.script.chunks, fake.script.hang_after = 10, 3
    reader, writer = await open_stream(sidecar.port, CHAT)
    await read_tokens(reader, 3)
    closed = time.monotonic()
    writer.close()
    await wait_for(lambda: fake.last().closed_at is not None, 3)
    assert fake.last().closed_at - closed < 1.0
    await wait_for(lambda: len(sidecar.rows) == 1)
    assert sidecar.rows[0]["outcome"] == "client_disconnected"


async def test_disconnect_while_sending_body_is_recorded(fake, sidecar):
    _reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"model":')
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await wait_for(lambda: len(sidecar.rows) == 1)
    assert sidecar.rows[0]["outcome"] == "client_disconnected"
    assert fake.received == []
