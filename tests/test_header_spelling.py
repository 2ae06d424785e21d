"""Header names keep the upstream's spelling (and the client's, on the way up), and a relayed answer carries no
header the upstream did not send beyond the documented ones (`x-request-id`, `x-ratelimit-*`, CORS) and the
framing (`Date`, `Content-Length`/`Transfer-Encoding`, `Connection`).

The upstream here is a bare asyncio server that writes its head byte for byte (aiohttp would add its own
`Server` and `Content-Type`), and the client reads the answer off a raw socket, so the exact bytes of every
header name are seen.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.support.bodies import CHAT, CHAT_PATH, STREAM
from tests.support.clients import raw

USAGE = b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
SMALL = b'{"id":"x","object":"chat.completion","choices":[],' + USAGE + b"}"
LARGE = b'{"id":"x","pad":"' + b"a" * (1536 * 1024) + b'",' + USAGE + b"}"  # over relay.BUFFERED: `_relay_body`
EVENTS = (
    b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: {"choices":[],'
    + USAGE
    + b"}\n\ndata: [DONE]\n\n"
)


class RawUpstream:
    """Answers every request with `head` (its lines, as written) and `body`; keeps each request head it got."""

    def __init__(self) -> None:
        self.head: list[bytes] = []
        self.body = b""
        self.chunked = False
        self.heads: list[bytes] = []
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % len(self.body)
            writer.write(b"\r\n".join([b"HTTP/1.1 200 OK", *self.head, framing, b"Connection: close", b"", b""]))
            if self.chunked:
                for event in self.body.split(b"\n\n")[:-1]:
                    writer.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(self.body)
            await writer.drain()
        finally:
            writer.close()

    def sent_names(self) -> list[bytes]:
        """The header names of the last request the sidecar sent, as spelled on the wire."""
        return [line.split(b":", 1)[0] for line in self.heads[-1].split(b"\r\n")[1:] if line]


@pytest.fixture
async def up() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    try:
        yield upstream
    finally:
        server.close()
        await server.wait_closed()


def request(body: dict[str, Any], extra: bytes = b"") -> bytes:
    payload = orjson.dumps(body)
    return (
        b"POST "
        + CHAT_PATH.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(payload)
        + payload
    )


def head_lines(answer: bytes) -> list[tuple[bytes, bytes]]:
    """The answer's header lines as (name, value), names as spelled on the wire."""
    head = answer.partition(b"\r\n\r\n")[0]
    return [(n, v.strip()) for n, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])]


def named(lines: list[tuple[bytes, bytes]], name: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in lines if n.lower() == name.lower()]


UPSTREAM_HEAD = [
    b"Access-Control-Allow-Origin: *",
    b"X-Custom-Upstream: yes",
    b"X-Request-Id: up-1",
    b"Cache-Control: no-cache",
]


@pytest.mark.parametrize("size", ["whole", "relayed"])
async def test_a_whole_answer_keeps_the_upstreams_spelling_and_gains_no_server_or_content_type(
    up, sidecar_factory, size
):
    """No `Server` and no `Content-Type` from the upstream: none on the answer either (aiohttp would add its own
    `Server` and `Content-Type: application/octet-stream`); its header names arrive as it spelled them."""
    up.head, up.body = UPSTREAM_HEAD, (SMALL if size == "whole" else LARGE)
    running = await sidecar_factory(up.url)
    answer = await raw(running.port, request(CHAT))
    lines = head_lines(answer)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(up.body)
    names = [n for n, _ in lines]
    assert {b"Access-Control-Allow-Origin", b"X-Custom-Upstream", b"Cache-Control"} <= set(names), names
    assert not named(lines, b"server") and not named(lines, b"content-type"), lines
    (rid,) = named(lines, b"x-request-id")  # ours replaces the upstream's: one header, in our spelling
    assert rid[0] == b"x-request-id" and rid[1] != b"up-1"
    added = {n.lower() for n in names} - {n.split(b":")[0].lower() for n in UPSTREAM_HEAD}
    assert added <= {b"x-request-id", b"date", b"content-length", b"transfer-encoding", b"connection"}, added


async def test_a_stream_keeps_the_upstreams_spelling_and_gains_no_server(up, sidecar_factory):
    up.head = [b"Content-Type: text/event-stream", b"Cache-Control: no-cache", b"X-Accel-Buffering: no"]
    up.body, up.chunked = EVENTS, True
    running = await sidecar_factory(up.url)
    answer = await raw(running.port, request(STREAM))
    lines = head_lines(answer)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in answer
    names = [n for n, _ in lines]
    assert {b"Content-Type", b"Cache-Control", b"X-Accel-Buffering"} <= set(names), names
    assert named(lines, b"content-type") == [(b"Content-Type", b"text/event-stream")]
    assert not named(lines, b"server"), lines
    assert [n for n, _ in named(lines, b"x-request-id")] == [b"x-request-id"]


async def test_the_upstreams_server_is_kept_as_it_spelled_it(up, sidecar_factory):
    up.head, up.body = [b"Server: llama.cpp", b"Content-Type: application/json; charset=utf-8"], SMALL
    running = await sidecar_factory(up.url)
    lines = head_lines(await raw(running.port, request(CHAT)))
    assert named(lines, b"server") == [(b"Server", b"llama.cpp")], lines
    assert named(lines, b"content-type") == [(b"Content-Type", b"application/json; charset=utf-8")], lines


async def test_the_upstream_gets_the_clients_spelling(up, sidecar_factory):
    """A known name (`content-type`, which aiohttp's parser spells `Content-Type`) and an unknown one keep the
    client's spelling; the headers the sidecar sets keep theirs, and a client's `X-Request-Id` is replaced."""
    up.head, up.body = [b"Content-Type: application/json"], SMALL
    running = await sidecar_factory(up.url)
    extra = (
        b"X-Custom-Thing: 1\r\nuser-agent: ua/1\r\nACCEPT: */*\r\nX-REQUEST-ID: mine\r\nx-FORWARDED-for: 10.9.9.9\r\n"
    )
    answer = await raw(
        running.port, request(CHAT, extra).replace(b"Content-Type: application/json", b"content-type: application/json")
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    names = up.sent_names()
    assert {b"X-Custom-Thing", b"user-agent", b"ACCEPT", b"content-type"} <= set(names), names
    lowered = [n.lower() for n in names]
    for ours in (b"x-request-id", b"x-forwarded-for", b"accept-encoding"):  # one each, as documented
        assert lowered.count(ours) == 1 and ours in names, names
    assert b"X-REQUEST-ID: mine" not in up.heads[-1] and b"10.9.9.9" not in up.heads[-1]


async def test_cors_headers_are_ours_once_whatever_the_upstream_spelled(up, sidecar_factory):
    up.head = [
        b"ACCESS-CONTROL-ALLOW-ORIGIN: *",
        b"Access-Control-Allow-Headers: a",
        b"access-control-allow-headers: b",
    ]
    up.body = SMALL
    running = await sidecar_factory(up.url, server__cors_origins="http://app.example")
    lines = head_lines(await raw(running.port, request(CHAT, b"Origin: http://app.example\r\n")))
    assert named(lines, b"access-control-allow-origin") == [(b"access-control-allow-origin", b"http://app.example")]
    assert not named(lines, b"access-control-allow-headers"), lines
