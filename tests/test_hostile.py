"""Hostile HTTP over raw sockets: smuggling shapes, oversized headers, path tricks, compressed and huge bodies.

Each gets a 4xx (never a 5xx) and the upstream sees nothing. Slow heads and bodies are in test_edge.py,
generated bodies and paths in test_fuzz.py, network faults in test_faults.py.
"""

from __future__ import annotations

import asyncio

import pytest

H = b"Host: x\r\n"
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\n"
CASES = {
    "content-length and transfer-encoding": CHAT
    + H
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate transfer-encoding": CHAT
    + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "obfuscated transfer-encoding": CHAT + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "space before colon": CHAT + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bare CR": CHAT + b"Host: x\rX-A: b\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": CHAT + H + b"X-A: b\r\n c\r\nContent-Length: 0\r\n\r\n",
    "two content-lengths": CHAT + H + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "oversized header": b"GET /v1/models HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 20000 + b"\r\n\r\n",
    "too many headers": b"GET /v1/models HTTP/1.1\r\n" + H + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "dot-dot": b"GET /v1/../metrics HTTP/1.1\r\n" + H + b"\r\n",
    "encoded dot-dot": b"GET /v1/%2e%2e/metrics HTTP/1.1\r\n" + H + b"\r\n",
    "encoded slash": b"POST /v1/chat%2Fcompletions HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\n{}",
    "double slash": b"POST /v1//chat/completions HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\n{}",
    "semicolon": b"GET /v1/models;x HTTP/1.1\r\n" + H + b"\r\n",
    "dot segment": b"GET /v1/./models HTTP/1.1\r\n" + H + b"\r\n",
    "case variant": b"GET /V1/Models HTTP/1.1\r\n" + H + b"\r\n",
    "absolute form": b"GET http://evil/v1/models HTTP/1.1\r\n" + H + b"\r\n",
    "vllm admin route": b"POST /v1/load_lora_adapter HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\n{}",
    "NUL in model": CHAT + H + b'Content-Length: 37\r\n\r\n{"model": "a\\u0000b", "messages": []}',
    "escape in model": CHAT + H + b'Content-Length: 37\r\n\r\n{"model": "a\\u001bb", "messages": []}',
    "gzip body": CHAT + H + b"Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
    "declared body too large": CHAT + H + b"Content-Length: 99999999\r\n\r\n{",
    "chunked body too large": CHAT
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"FFFF\r\n" + b"a" * 65535 + b"\r\n" for _ in range(40))
    + b"0\r\n\r\n",
}


MUST_CLOSE = {
    "content-length and transfer-encoding",
    "duplicate transfer-encoding",
    "obfuscated transfer-encoding",
    "space before colon",
    "bare CR",
    "obs-fold",
    "two content-lengths",
    "oversized header",
    "too many headers",
}


@pytest.mark.parametrize("name", list(CASES))
async def test_hostile_request_gets_a_4xx_and_never_reaches_the_upstream(fake, sidecar_factory, name):
    running = await sidecar_factory(fake.url, server__max_body_bytes=1_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(CASES[name])
        await writer.drain()
    except ConnectionError:
        pass  # the server may close before reading everything: that is a refusal too
    head, closed = b"", False
    try:
        head = await asyncio.wait_for(reader.readline(), 5)
        if name in MUST_CLOSE:  # ambiguous framing: after the answer the connection must close
            await asyncio.wait_for(reader.read(), 5)
            closed = reader.at_eof()
    except ConnectionError:
        closed = True  # reset: closed too
    writer.close()
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.") else 0
    assert 400 <= status < 500 or status == 0, (name, head)
    assert closed or name not in MUST_CLOSE, name
    assert fake.received == []


@pytest.mark.parametrize("value", ["é€".encode(), b"\xff\xfe"], ids=["utf-8", "not utf-8"])
async def test_header_bytes_beyond_ascii_reach_the_upstream_unchanged(fake, sidecar_factory, value):
    running = await sidecar_factory(fake.url)
    body = b'{"model": "m", "messages": []}'
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    writer.write(CHAT + H + b"X-Name: " + value + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    head = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert fake.last().headers["x-name"].encode("utf-8", "surrogateescape") == value
