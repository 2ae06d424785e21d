"""Our own answers, with the request's id (every route's, proxied or not): a JSON document or an OpenAI-shaped
error (Anthropic-shaped to a Messages client); and in a stream of ours, the SSE error event that ends a failed
stream (`end_stream`, `answer_error`) and the answer a streamed request waiting in the dispatch queue starts with
its keep-alive comments (`KeptAlive`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from sidecar.errors import SidecarError, UpstreamError, anthropic_body
from sidecar.records.record import RequestRecord

if TYPE_CHECKING:  # the exchange holds our answer; it is the pipeline's, imported only for the type
    from sidecar.exchange import Exchange

ERROR_EVENT_WRITE_TIMEOUT = 5.0
KEEPALIVE_COMMENT = b": keepalive\n\n"  # an SSE comment: every client's parser skips it


def json_response(doc: Any, request_id: str, status: int = 200) -> web.Response:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers)


def error_response(
    err: SidecarError, request_id: str, extra: Mapping[str, str] | None = None, anthropic: bool = False
) -> web.Response:
    headers = {**err.headers, **(extra or {}), "x-request-id": request_id, "content-type": "application/json"}
    body = anthropic_body(err) if anthropic else err.body()
    return web.Response(status=err.status, body=body, headers=headers)


class ClientGone(Exception):
    """The client's connection closed while the proxy was reading its body or writing to it (no text: it is
    caught by type, and the record says what happened)."""


async def write(resp: web.StreamResponse, data: bytes, rec: RequestRecord) -> None:
    """`data` to a started answer through aiohttp's write, counted in the row; a closed client is `ClientGone`."""
    try:
        await resp.write(data)
    except (ConnectionError, aiohttp.ClientConnectionError):
        raise ClientGone from None
    rec.bytes_out += len(data)


def abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def sse_error_event(err: SidecarError, anthropic: bool = False) -> bytes:
    """The event that ends a failed stream: `data` is the error in the client's API's shape."""
    return b"event: error\ndata: " + (anthropic_body(err) if anthropic else err.body()) + b"\n\n"


async def end_stream(
    request: web.Request, resp: web.StreamResponse, err: SidecarError, anthropic: bool
) -> web.StreamResponse:
    """Ends a started SSE answer with `err` as its terminal error event (no `[DONE]`)."""
    try:
        async with asyncio.timeout(ERROR_EVENT_WRITE_TIMEOUT):
            await resp.write(sse_error_event(err, anthropic))
            await resp.write_eof()
    except (TimeoutError, ConnectionError, aiohttp.ClientConnectionError):
        abort(request)  # the client is gone or stuck too; the record already says why the stream ended
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # Not a cancel of ours: aiohttp keeps the drain waiter that the deadline cancelled while a client
        # that stopped reading held the write, and hands it back on the next write. The client is stuck.
        abort(request)
    return resp


def answer_error(status: int, body: bytes) -> SidecarError:
    """The upstream's answer as an error event can say it: its own message (and type and code, when it gave
    them) at its status; a whole 2xx answer where a stream was asked for is a 502."""
    if status < 300:
        return UpstreamError("The upstream answered the streamed request with a whole (not streamed) answer.")
    found: Any = None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):  # OpenAI's {"error": {...}}, Anthropic's {"type": "error", "error": {...}}, vLLM's
        found = doc.get("error") if isinstance(doc.get("error"), dict) else doc
    found = found if isinstance(found, dict) else {}
    message = found.get("message")
    kind, code = found.get("type"), found.get("code")
    err = UpstreamError(
        message[:2000] if isinstance(message, str) and message else f"The upstream answered with status {status}.",
        code=code if isinstance(code, str) else "upstream_status",
        type_=kind if isinstance(kind, str) else None,
    )
    err.status = status
    return err


class KeptAlive:
    """A streamed request's wait in the dispatch queue, kept alive for the load balancers and proxies that close
    a connection idle too long (`server.sse_keepalive`). A wait shorter than `interval` looks exactly as one
    without it; past it the SSE answer starts (200, `x-request-id`, the `x-ratelimit-*` figures of that moment,
    CORS) and a comment goes out every `interval` seconds until the request is dispatched. A comment that cannot
    be written means the client left (`ClientGone`)."""

    __slots__ = ("ex", "interval", "limit_headers", "request")

    def __init__(
        self, request: web.Request, ex: Exchange, interval: float, limit_headers: Callable[[], dict[str, str]]
    ) -> None:
        self.request = request
        self.ex = ex
        self.interval = interval
        self.limit_headers = limit_headers

    async def __call__(self, waiting: asyncio.Future[Any]) -> None:
        """Returns when `waiting` is done (whatever its result: the caller reads it)."""
        while not (await asyncio.wait((waiting,), timeout=self.interval))[0]:
            resp = self.ex.resp or await self._start()
            await write(resp, KEEPALIVE_COMMENT, self.ex.rec)

    async def _start(self) -> web.StreamResponse:
        ex = self.ex
        headers = {**self.limit_headers(), **ex.cors, "x-request-id": ex.rec.request_id}
        headers.update({"content-type": "text/event-stream", "cache-control": "no-cache"})
        resp = web.StreamResponse(status=200, headers=headers)
        try:
            await resp.prepare(self.request)
        except (ConnectionError, aiohttp.ClientConnectionError):
            raise ClientGone from None
        ex.resp = resp
        return resp
