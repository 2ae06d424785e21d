"""The keep-alive race with the upstream: it closes a pooled connection just as the next request goes out on it.

A raw asyncio upstream answers the first request on a connection with keep-alive, then closes that connection
(FIN or RST) when the next request arrives on it, without reading it: exactly what a client sees when the
upstream's idle timer fires as the request is sent. The sidecar must send that request again on a fresh
connection (once), so the client gets its answer; a request that fails on a fresh connection is not retried.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
ANSWER = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [], "usage": {"total_tokens": 1}})


@dataclass
class RacyUpstream:
    """Serves one request per connection, then closes the connection when the next request starts on it."""

    abort: bool  # RST instead of FIN
    drop_first: bool = False  # also drop the very first request of a fresh connection
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)
    refused: int = 0
    port: int = 0

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            served = 0
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET "):  # the sidecar's own ask for the model list (on a scrape): not ours
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    self.connections -= 1
                    return
                if served or self.drop_first:
                    self.refused += 1
                    if self.abort:
                        writer.transport.abort()
                    else:
                        writer.close()
                    return
                length = int(
                    next(
                        v
                        for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                        if k.lower() == b"content-length"
                    )
                )
                self.bodies.append(await reader.readexactly(length))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(ANSWER)
                    + ANSWER
                )
                await writer.drain()
                served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.mark.parametrize("abort", [False, True], ids=["fin", "rst"])
async def test_a_request_on_a_connection_closed_under_it_is_sent_again_on_a_fresh_one(sidecar_factory, abort):
    racy = RacyUpstream(abort=abort)
    server = await racy.start()
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{racy.port}/v1")
        async with aiohttp.ClientSession() as client:
            for _ in range(5):
                async with client.post(running.url + "/v1/chat/completions", data=BODY) as resp:
                    assert resp.status == 200, await resp.text()
                    assert await resp.read() == ANSWER
            async with client.get(running.url + "/metrics") as resp:
                metrics = await resp.text()
        # Requests 2 to 5 each met their pooled connection closing under them (the upstream serves one request
        # per connection); each was delivered whole, once, on a fresh connection.
        assert racy.refused == 4
        assert racy.bodies == [BODY] * 5
        assert "sidecar_upstream_stale_retries_total 4.0" in metrics
        assert [r["outcome"] for r in running.rows] == ["completed"] * 5
    finally:
        server.close()
        await server.wait_closed()


async def test_a_fresh_connection_dropped_without_an_answer_is_not_retried(sidecar_factory):
    racy = RacyUpstream(abort=False, drop_first=True)
    server = await racy.start()
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{racy.port}/v1")
        async with aiohttp.ClientSession() as client:
            async with client.post(running.url + "/v1/chat/completions", data=BODY) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"]["type"] == "upstream_error"
        assert racy.connections == 1
        assert running.rows[0]["outcome"] == "upstream_error"
    finally:
        server.close()
        await server.wait_closed()
