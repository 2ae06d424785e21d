"""Clients of a running sidecar: a whole POST (`post`), the admin API (`admin`, with `ADMIN`, the tests' admin
token), a keyed chat (`chat`), a scripted stream (`stream`), a raw socket stream a test can cut (`open_stream`)
and bytes no HTTP client would send, with the whole answer (`raw`)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from tests.support.bodies import CHAT, STREAM


async def post(url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """POST `body` (JSON, or bytes as they are) to `url`: (status, headers, whole body)."""
    sent = {"json": body} if isinstance(body, dict) else {"data": body}
    async with aiohttp.ClientSession() as s, s.post(url, headers=headers or {}, **sent) as r:
        answer: CIMultiDictProxy[str] = r.headers.copy()
        return r.status, answer, await r.read()


ADMIN = "admin-token-canary-1234"


async def admin(session, method, url, body=None, token=ADMIN):
    async with session.request(method, url, json=body, headers={"authorization": f"Bearer {token}"}) as r:
        return r.status, await r.json(), r.headers.get("x-request-id")


async def chat(session, url, key, body=None):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with session.post(url + "/v1/chat/completions", json=body or CHAT, headers=headers) as r:
        return r.status, await r.json()


async def open_stream(
    port: int, body: dict, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = orjson.dumps(body)
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode()
    writer.write(
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    await writer.drain()
    return reader, writer


async def stream(url, script):
    headers = {"x-fake-script": script}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/v1/chat/completions", json=STREAM, headers=headers) as r,
        ):
            return r.status, await r.read()
    except aiohttp.ClientError as exc:
        return 0, repr(exc).encode()


async def raw(port: int, request: bytes) -> bytes:
    """`request` as it is on a new connection (send `Connection: close`): the whole answer, head and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
