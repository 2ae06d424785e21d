"""The /v1 handler: authenticate, parse, lease, relay, and finish exactly one record. Nothing else.

The relay sends the upstream's bytes on as they arrive. Before the first byte reaches the client an error is
an OpenAI-shaped JSON response; after it, the stream ends with an SSE `error` event and no `[DONE]`, so a
client can tell a cut stream from a finished one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from sidecar.audit import Auditor, Capture
from sidecar.auth import Authenticator
from sidecar.calls import Call, parse
from sidecar.client import ConnectFailed, Response, ResponseTooLarge, UpstreamFailure
from sidecar.config import LimitsCfg, ServerCfg
from sidecar.deadline import Deadline, DeadlineExpired, Ticker
from sidecar.edge import read_body
from sidecar.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    SidecarError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.leases import Lease, LeaseManager
from sidecar.metrics import Metrics
from sidecar.records import CLIENT_CLOSED_REQUEST, Outcome, RequestRecord
from sidecar.rejects import REJECT_STATUSES, RejectSampler
from sidecar.sse import StreamScanner, usage_from
from sidecar.tokens import estimate_prompt
from sidecar.upstream import Upstream, allowed_methods

log = logging.getLogger("sidecar.proxy")

_ERROR_EVENT_WRITE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt: int
    reservation: int


class ClientGone(Exception):
    """The client's connection closed while the proxy was reading its body or writing to it."""


class UpstreamBroke(Exception):
    """The upstream connection failed after its response had started."""


@dataclass(slots=True)
class Exchange:
    """What one relay holds, so cleanup can see it whichever way the relay ends."""

    call: Call
    rec: RequestRecord
    lease: Lease
    prompt_estimate: int
    audit: bool = False
    response: Any = None  # the non-streaming response, kept for audit
    up: Response | None = None
    resp: web.StreamResponse | None = None
    scanner: StreamScanner | None = None
    clean: bool = False


def error_response(err: SidecarError, request_id: str) -> web.Response:
    headers = {**err.headers, "x-request-id": request_id, "content-type": "application/json"}
    return web.Response(status=err.status, body=err.body(), headers=headers)


def sse_error_event(err: SidecarError) -> bytes:
    return b"event: error\ndata: " + err.body() + b"\n\n"


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _is_sse(up: Response) -> bool:
    return up.headers.get("content-type", "").startswith("text/event-stream")


class Proxy:
    def __init__(
        self,
        upstream: Upstream,
        server: ServerCfg,
        limits: LimitsCfg,
        auth: Authenticator,
        leases: LeaseManager,
        metrics: Metrics,
        finish: Callable[[RequestRecord, bool], None],
        auditor: Auditor | None = None,
        rejects: RejectSampler | None = None,
    ) -> None:
        self.rejects = rejects
        self.ticker = Ticker()
        self.auditor = auditor
        self.limits = limits
        self.auth = auth
        self.leases = leases
        self.upstream = upstream
        self.cfg = upstream.cfg
        self.server = server
        self.metrics = metrics
        self._finish = finish
        self.active: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self._idle: asyncio.Event | None = None

    def cancel_all(self) -> int:
        """Shutdown: cancel every request still running; each ends with a `shutdown` record."""
        self.shutting_down = True
        for task in self.active:
            task.cancel()
        return len(self.active)

    async def wait_idle(self, timeout: float) -> None:
        if not self.active:
            return
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.error("requests still running after shutdown", extra={"fields": {"requests": len(self.active)}})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        client_id = request.headers.get("x-request-id")
        rec = RequestRecord.start(request.method, path[:256], client_id[:128] if client_id else None)
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        self.metrics.in_flight += 1
        lease: Lease | None = None
        capture: Capture | None = None
        ex: Exchange | None = None
        authenticated = False
        try:
            self._check_route(request.method, path)
            principal = self.auth.known(request.headers) or await self.auth.authenticate(request.headers)
            authenticated = True
            rec.key_id = principal.key_id
            call = await self._read_call(request, path, rec)
            if self.auditor is not None:
                capture = self.auditor.capture(rec.request_id, principal.audit, request.headers, call.doc)
            if call.doc is not None:
                principal.check_model(call.model)
            estimate = self._estimate(call)
            lease = self.leases.acquire_now(principal, estimate.reservation) or await self.leases.acquire(
                principal, estimate.reservation
            )
            ex = Exchange(call, rec, lease, estimate.prompt, audit=capture is not None)
            return await self._relay(request, ex)
        except SidecarError as err:
            rec.fail(err.status, err.outcome, err.code)
            return error_response(err, rec.request_id)
        except ClientGone:
            self._mark_gone(request, rec)
            return web.Response(status=CLIENT_CLOSED_REQUEST)  # aiohttp drops it: the socket is closed
        except asyncio.CancelledError:
            self._mark_gone(request, rec)
            raise
        finally:
            if lease is not None:
                lease.release()
            self.metrics.in_flight -= 1
            self.active.discard(task)
            if self._idle is not None and not self.active:
                self._idle.set()
            rejects = self.rejects  # a reject before any key is known: recorded within a per-source rate
            keep = authenticated or rec.status not in REJECT_STATUSES or rejects is None or rejects.keep(request.remote)
            self._finish(rec.finish(), keep)
            if capture is not None:
                self._audit(capture, rec, ex)

    def _audit(self, capture: Capture, rec: RequestRecord, ex: Exchange | None) -> None:
        assert self.auditor is not None
        scanner = ex.scanner if ex is not None else None
        stream = (scanner.regions, scanner.sep) if scanner is not None else None
        response = ex.response if ex is not None else None
        complete = rec.outcome == Outcome.COMPLETED and (scanner is None or scanner.done)
        self.auditor.finish(capture, rec.as_row(), response, stream, complete)

    def _check_route(self, method: str, path: str) -> None:
        if path not in self.upstream.paths:
            raise NotFound(f"Unknown path {path[:200]!r}.", code="unknown_url")
        methods = allowed_methods(path)
        if method not in methods:
            raise BadRequest(
                f"Method {method} is not allowed on {path}.",
                code="method_not_allowed",
                headers={"allow": ", ".join(methods)},
            )

    async def _read_call(self, request: web.Request, path: str, rec: RequestRecord) -> Call:
        limit = self.server.max_body_bytes
        encoding = request.headers.get("content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            raise UnsupportedMediaType("Compressed request bodies are not accepted; send identity encoding.")
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
        try:
            body = await read_body(request)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ClientGone(str(exc)) from None
        rec.bytes_in = len(body)
        call = parse(request.method, path, body, self.server.max_json_depth)
        rec.model = call.model
        rec.stream = call.stream
        return call

    def _mark_gone(self, request: web.Request, rec: RequestRecord) -> None:
        if _client_gone(request):
            rec.fail(CLIENT_CLOSED_REQUEST, Outcome.CLIENT_DISCONNECTED, "client_disconnected")
        else:  # cancelled with the client still there: the server is shutting down
            rec.fail(rec.status or 503, Outcome.SHUTDOWN, "server_shutting_down")

    def _estimate(self, call: Call) -> Estimate:
        if call.doc is None:
            return Estimate(0, 0)
        prompt = estimate_prompt(call.doc, len(call.body))
        output = 0 if call.path == "/v1/embeddings" else (call.max_tokens or self.limits.default_max_tokens)
        return Estimate(prompt, prompt + output)

    async def _relay(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        cfg = self.cfg
        try:
            limits = (cfg.first_byte_timeout, cfg.stream_idle_timeout, cfg.total_timeout)
            async with Deadline(self.ticker, *limits) as deadline:
                return await self._exchange(request, ex, deadline)
        except DeadlineExpired as exc:
            self.metrics.upstream_error("timeout_first_byte" if exc.reason == "first_byte" else "timeout_idle")
            return await self._fail(ex, UpstreamTimeout(f"The upstream did not answer in time ({exc})."))
        except UpstreamBroke as exc:
            self.metrics.upstream_error("dropped")
            return await self._fail(
                ex, UpstreamError(f"The upstream connection broke mid-response: {exc}", code="upstream_dropped")
            )
        except asyncio.CancelledError:
            if not self.shutting_down or _client_gone(request):
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own shutdown cancel: end the response properly instead
            return await self._fail(ex, ShuttingDown("The server is shutting down; retry the request."))
        finally:
            self._settle(ex)
            if ex.up is not None:
                if ex.clean:
                    ex.up.release()
                else:  # closing (not releasing) the connection is what stops the model generating
                    ex.up.close()

    async def _exchange(self, request: web.Request, ex: Exchange, deadline: Deadline) -> web.StreamResponse:
        ex.up = up = await self._send(request, ex)
        ex.rec.upstream_status = up.status
        if up.status >= 500:
            self.metrics.upstream_error("status_5xx")
        if not _is_sse(up):
            return await self._whole(ex, up, deadline)
        return await self._stream(request, ex, up, deadline)

    async def _send(self, request: web.Request, ex: Exchange) -> Response:
        up = self.upstream
        target = up.target(ex.call.path, request.raw_path.partition("?")[2])
        headers = up.request_headers(request.headers, ex.rec.request_id, request.remote)
        try:
            return await up.send(request.method, target, headers, ex.call.upstream_body())
        except ConnectFailed as exc:
            self.metrics.upstream_error("connect")
            raise UpstreamError(f"Cannot connect to the upstream: {exc}.", code="upstream_unreachable") from None
        except UpstreamFailure as exc:
            self.metrics.upstream_error("protocol")
            raise UpstreamError(f"The upstream request failed: {exc}.") from None

    async def _whole(self, ex: Exchange, up: Response, deadline: Deadline) -> web.Response:
        # The body follows its headers at once (generation happened before them): the first-byte limit stays.
        limit = self.cfg.max_response_bytes
        declared = up.content_length
        if declared is not None and declared > limit:
            raise UpstreamError(f"The upstream response is {declared} bytes, over the configured limit.")
        try:
            body = await up.read(limit)
        except ResponseTooLarge:
            raise UpstreamError(f"The upstream response is over the configured limit of {limit} bytes.") from None
        except UpstreamFailure as exc:
            self.metrics.upstream_error("dropped")
            raise UpstreamError(f"The upstream response broke: {exc}.", code="upstream_dropped") from None
        ex.clean = True
        rec = ex.rec
        rec.status = up.status
        if ex.audit:
            ex.response = _json_or_text(body)
        rec.bytes_out = len(body)
        if up.status >= 500:
            rec.outcome, rec.error_code = Outcome.UPSTREAM_ERROR, "upstream_status"
        elif up.status < 300:
            rec.mark_first_token()  # a whole body: its tokens reach the client all at once, now
            self._usage_from_body(rec, body)
            ex.lease.settle(rec.prompt_tokens, rec.completion_tokens)
        headers = self.upstream.response_headers(up.headers, rec.request_id)
        headers.update(ex.lease.headers)
        return web.Response(status=up.status, body=body, headers=headers)

    async def _stream(self, request: web.Request, ex: Exchange, up: Response, deadline: Deadline) -> web.StreamResponse:
        rec = ex.rec
        call = ex.call
        ex.scanner = scanner = StreamScanner(call.wants_hidden_usage, ex.audit, call.path, call.tools)
        read = up.readany
        loop = asyncio.get_running_loop()
        chunk = await self._read(read)
        deadline.first_byte(loop.time())
        headers = self.upstream.response_headers(up.headers, rec.request_id)
        headers.update(ex.lease.headers)
        resp = web.StreamResponse(status=up.status, headers=headers)
        rec.status = up.status
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        ex.resp = resp
        while chunk:
            rec.chunks += 1
            data = scanner.feed(chunk)
            if rec.ttft_ms is None and scanner.first_output:
                rec.mark_first_token()
            if data:
                await self._write(resp, data, rec)
            chunk = await self._read(read)
            deadline.touch(loop.time())
        tail = scanner.flush()
        if tail:
            await self._write(resp, tail, rec)
        ex.clean = True
        await resp.write_eof()
        return resp

    @staticmethod
    async def _read(read: Callable[[], Any]) -> bytes:
        try:
            chunk: bytes = await read()
        except UpstreamFailure as exc:
            raise UpstreamBroke(str(exc)) from None
        return chunk

    @staticmethod
    async def _write(resp: web.StreamResponse, data: bytes, rec: RequestRecord) -> None:
        try:
            await resp.write(data)
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        rec.bytes_out += len(data)

    async def _fail(self, ex: Exchange, err: SidecarError) -> web.StreamResponse:
        """An upstream failure: a JSON error before the stream started, a terminal SSE event after."""
        if ex.resp is None:
            raise err
        ex.rec.outcome, ex.rec.error_code = err.outcome, err.code
        try:
            async with asyncio.timeout(_ERROR_EVENT_WRITE_TIMEOUT):
                await ex.resp.write(sse_error_event(err))
                await ex.resp.write_eof()
        except (TimeoutError, ConnectionError, aiohttp.ClientConnectionError):
            pass  # the client is gone or stuck too; the record already says why the stream ended
        return ex.resp

    def _settle(self, ex: Exchange) -> None:
        """Usage for a stream: the upstream's usage event, else the output deltas counted so far."""
        scanner = ex.scanner
        if scanner is None:
            return
        rec = ex.rec
        if scanner.usage is not None:
            u = scanner.usage
            rec.set_usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens, "upstream")
        else:
            rec.set_usage(ex.prompt_estimate or None, scanner.deltas, None, "counted")
        ex.lease.settle(rec.prompt_tokens, rec.completion_tokens)

    @staticmethod
    def _usage_from_body(rec: RequestRecord, body: bytes) -> None:
        usage = usage_from(usage_object(body))
        if usage is not None:
            rec.set_usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, "upstream")


def _json_or_text(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def usage_object(body: bytes) -> Any:
    """The top-level `usage` object of a JSON response, found from the end without parsing the whole body.

    Embeddings answers are megabytes of floats with `usage` near the end. A key `"usage"` followed by `:` and
    `{` cannot come from inside a JSON string (quotes there are escaped), so the last such match is the key.
    """
    at = len(body)
    while True:
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            return None
        i = at + 7
        while i < len(body) and body[i] in b" \t\r\n":
            i += 1
        if i < len(body) and body[i] == 0x3A:  # ':'
            i += 1
            while i < len(body) and body[i] in b" \t\r\n":
                i += 1
            if i < len(body) and body[i] == 0x7B:  # '{'
                return _object_at(body, i)


def _object_at(body: bytes, start: int) -> Any:
    # A usage object is small and nests at most one level (`prompt_tokens_details`): try each closing brace.
    end = start
    for _ in range(8):
        end = body.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            return orjson.loads(body[start : end + 1])
        except orjson.JSONDecodeError:
            continue
    return None
