"""The HTTP edge: aiohttp's connection handler with a deadline for the request head and one for the body.

aiohttp bounds header sizes but not the time a client takes to send them: a connection opened and fed one
byte every few seconds (slowloris) holds a socket and a task until the keep-alive timer fires, and a body
trickled byte by byte holds a request handler (and, for us, a record in flight) for as long as the client
likes. nginx's `client_header_timeout` and `client_body_timeout` are the model:

- head: from the connection's first moment, or from the first byte of a later request on a kept-alive
  connection, the whole head must arrive within `header_timeout`. A connection that sent part of a head gets
  `408` and is closed; one that sent nothing is closed silently (it was idle).
- body: once the head is in, the whole body must arrive within `body_timeout`. The request's body stream is
  failed with `BodyTimeout`, which the handler turns into an OpenAI-shaped `408`; the connection is then
  closed, since the rest of that body can no longer be told from a next request.

Idle keep-alive connections keep aiohttp's own timer (`server.keepalive_timeout`).

A request aiohttp cannot parse (bare LF line endings, a control byte in a header, an oversized line, ambiguous
framing) is answered here, not by aiohttp's default, which echoes the raw head (an `Authorization` line
included) in a text/plain 400 and logs it with a traceback: the answer is an OpenAI-shaped JSON error that
names what was wrong, the log line names the error's kind and the peer, and neither quotes the head.

What this needs of aiohttp's internals is in one place, `AiohttpInternals`: three attributes of its
`RequestHandler` (`_messages`, the parsed requests not yet handled; `_request_in_progress`; `_lingering_time`,
set to 0), the keyword arguments its `Server` keeps (`_kwargs`), and the step of a `StreamResponse` that adds
default headers (`_prepare_headers`, on its `_headers`), which a relayed answer undoes (`RelayedResponse`).
`AiohttpInternals.check()` runs when the runner is built and fails loudly, naming what is missing, after an
aiohttp upgrade that moved them; pyproject pins aiohttp's minor version, and tests/test_edge.py checks the
meaning as well as the names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import hdrs, http_exceptions, web
from aiohttp.streams import StreamReader

from sidecar.errors import BadRequest, PayloadTooLarge, RequestTimeout, SidecarError
from sidecar.records.record import new_request_id

# What a parse error was, in words, by aiohttp's exception class (the first match in this order wins).
_PARSE_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (http_exceptions.LineTooLong, "a request line or header line is too long"),
    (http_exceptions.BadStatusLine, "the request line is malformed (or lines do not end with CRLF)"),
    (http_exceptions.BadHttpMethod, "the request method is not valid"),
    (http_exceptions.InvalidURLError, "the request target is not valid"),
    (http_exceptions.InvalidHeader, "a header is malformed"),
    (http_exceptions.TransferEncodingError, "the body's transfer encoding is malformed"),
    (http_exceptions.ContentLengthError, "the body's length is malformed"),
    (http_exceptions.BadHttpMessage, "the request head is malformed"),
)

_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
)


class BodyTimeout(Exception):
    """The request body did not arrive within `server.body_timeout`."""


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    header_timeout: float
    body_timeout: float
    server_name: str = ""  # `server.server_header`: what our own answers say in `Server` (empty: nothing)


async def read_body(request: web.Request) -> bytes:
    """The whole request body, with the edge's limits as OpenAI-shaped errors (413, 408)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise PayloadTooLarge(f"The request body exceeds the limit of {limit} bytes.") from None
    except BodyTimeout as exc:
        raise RequestTimeout(str(exc)) from None


class AiohttpInternals:
    """Every private attribute of aiohttp that the edge reads or sets, behind one small adapter."""

    HANDLER = ("_messages", "_request_in_progress", "_lingering_time", "_loop")
    SERVER = ("_kwargs", "_loop")
    RUNNER = ("_make_server",)
    RESPONSE = ("_prepare_headers", "_headers")  # `RelayedResponse`/`RelayedStream` (the headers it adds)

    @staticmethod
    def check(handler: object, server: object, runner: object = web.AppRunner, response: object = None) -> None:
        response = web.StreamResponse() if response is None else response
        missing = [f"RequestHandler.{a}" for a in AiohttpInternals.HANDLER if not hasattr(handler, a)]
        missing += [f"Server.{a}" for a in AiohttpInternals.SERVER if not hasattr(server, a)]
        missing += [f"AppRunner.{a}" for a in AiohttpInternals.RUNNER if not hasattr(runner, a)]
        missing += [f"StreamResponse.{a}" for a in AiohttpInternals.RESPONSE if not hasattr(response, a)]
        if missing:
            raise RuntimeError(
                f"aiohttp {aiohttp.__version__} lacks what sidecar/edge.py relies on ({', '.join(missing)}): "
                "pin aiohttp to the minor version pyproject names, or adapt AiohttpInternals"
            )

    @staticmethod
    def parsed(handler: web.RequestHandler) -> Sequence[tuple[object, StreamReader]]:
        """The requests whose heads are parsed and not yet handled (each a (message, payload) pair)."""
        return handler._messages

    @staticmethod
    def in_progress(handler: web.RequestHandler) -> bool:
        return bool(handler._request_in_progress)

    @staticmethod
    def no_lingering(handler: web.RequestHandler) -> None:
        """Close at once, without reading what is left of a request body."""
        handler._lingering_time = 0.0

    @staticmethod
    def server_kwargs(server: web.Server) -> dict[str, Any]:
        return server._kwargs


class EdgeHandler(web.RequestHandler):
    __slots__ = ("_body", "_body_timer", "_head_bytes", "_head_timer", "_limits")

    def __init__(self, manager: web.Server, *, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head()
        self._stop_body()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        parsed = AiohttpInternals.parsed(self)
        if parsed:  # a whole head was parsed: its body, if any, is now on the clock
            self._stop_head()
            payload = parsed[-1][1]
            if not payload.is_eof() and payload is not self._body:
                self._watch_body(payload)
        elif not AiohttpInternals.in_progress(self) and data:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first byte of a kept-alive connection's next request
                self._arm_head()
        if self._body is not None and self._body.is_eof():
            self._stop_body()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's last-resort answer (a parse error, or an exception that escaped a handler), without ever
        quoting the request: `message` and `str(exc)` of a parse error hold the raw head."""
        what = next((text for cls, text in _PARSE_ERRORS if isinstance(exc, cls)), None)
        fields = {"peer": request.remote, "status": status, "error": type(exc).__name__ if exc else None}
        if what is not None:
            self.logger.warning("unparseable request: %s", what, extra={"fields": fields})
            err: SidecarError = BadRequest(f"Malformed HTTP request: {what}.", code="malformed_request")
            err.status = status if 400 <= status < 500 else 400
        else:  # our own bug: the traceback (code locations, never the request) is for the log
            self.logger.error("request failed", exc_info=exc, extra={"fields": fields})
            err = SidecarError("The server failed to handle the request.", code="internal_error")
            err.status = status
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started: the connection can only be closed")
        headers = {"server": self._limits.server_name, "x-request-id": new_request_id()}
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json", headers=headers)
        resp.force_close()
        return resp

    def _arm_head(self) -> None:
        if self._limits.header_timeout > 0:
            self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_expired)

    def _stop_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0

    def _head_expired(self) -> None:
        self._head_timer = None
        if AiohttpInternals.parsed(self) or AiohttpInternals.in_progress(self) or self.transport is None:
            return
        if self._head_bytes:  # a client mid-head gets told why; an idle connection is just closed
            body = RequestTimeout("The request head did not arrive in time.").body()
            self.transport.write(_REQUEST_TIMEOUT % len(body) + body)
        self.force_close()

    def _watch_body(self, payload: StreamReader) -> None:
        self._stop_body()
        if self._limits.body_timeout > 0:
            self._body = payload
            self._body_timer = self._loop.call_later(self._limits.body_timeout, self._body_expired)

    def _stop_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    def _body_expired(self) -> None:
        payload, self._body, self._body_timer = self._body, None, None
        if payload is None or payload.is_eof():
            return
        # The unread rest of the body is garbage now: close after the 408 instead of draining it.
        AiohttpInternals.no_lingering(self)
        self.close()
        payload.set_exception(BodyTimeout(f"The request body did not arrive within {self._limits.body_timeout:g}s."))


class EdgeServer(web.Server):
    """aiohttp's connection factory, making `EdgeHandler`s."""

    def __init__(self, limits: EdgeLimits, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> EdgeHandler:
        return EdgeHandler(self, loop=self._loop, limits=self.limits, **AiohttpInternals.server_kwargs(self))


RELAYED = web.RequestKey("relayed", bool)  # set on a request whose answer is the upstream's, with its headers


class RelayedStream(web.StreamResponse):
    """A relayed answer sent as it arrives: aiohttp's `StreamResponse` without the headers aiohttp adds of its
    own when the upstream sent none: `Server` (aiohttp's name and version) and `Content-Type`
    (`application/octet-stream` on any body). The answer carries the upstream's headers, ours (`x-request-id`,
    `x-ratelimit-*`, CORS) and the framing (`Date`, `Content-Length`/`Transfer-Encoding`, `Connection`)."""

    async def _prepare_headers(self) -> None:
        headers = self._headers
        server, typed = hdrs.SERVER in headers, hdrs.CONTENT_TYPE in headers
        await super()._prepare_headers()
        if not server:
            headers.popall(hdrs.SERVER, None)
        if not typed:
            headers.popall(hdrs.CONTENT_TYPE, None)


class RelayedResponse(web.Response, RelayedStream):
    """A whole relayed answer: aiohttp's `Response`, with `RelayedStream`'s headers."""


def server_header(name: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook for `server.server_header`. Set, every answer says it; empty, a relayed
    answer keeps the upstream's `Server` (or has none, as the upstream's) and one of our own says nothing (an
    empty value: aiohttp would send its own name and version otherwise)."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        # aiohttp has set its own default by now; a relayed answer carries the upstream's (or none: `Relayed*`).
        if name or not request.get(RELAYED, False):
            response.headers["Server"] = name

    return hook


class EdgeRunner(web.AppRunner):
    """An AppRunner whose server makes `EdgeHandler`s; everything else (startup, cleanup, sites) is aiohttp's."""

    def __init__(self, app: web.Application, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        server = EdgeServer(
            self.limits,
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **AiohttpInternals.server_kwargs(base),
        )
        AiohttpInternals.check(server(), server)  # at start, loudly, rather than on the first slow client
        return server
