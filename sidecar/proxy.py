"""The /v1 handler: authenticate, parse, lease, relay, and finish exactly one record. Nothing else.

The relay sends the upstream's bytes on as they arrive. Before the first byte reaches the client an error is
an OpenAI-shaped JSON response; after it, the stream ends with an SSE `error` event and no `[DONE]`, so a
client can tell a cut stream from a finished one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from sidecar.aggregate import StreamCapture
from sidecar.audit import Auditor, BodyCapture, Capture
from sidecar.auth import Authenticator
from sidecar.calls import Call, parse
from sidecar.client import ConnectFailed, PoolExhausted, Response, UpstreamFailure
from sidecar.config import LimitsCfg, ServerCfg
from sidecar.cors import Cors, is_preflight
from sidecar.deadline import Deadline, DeadlineExpired, Limit, Ticker
from sidecar.edge import RELAYED, read_body
from sidecar.errors import (
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ShuttingDown,
    SidecarError,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamTimeout,
)
from sidecar.leases import Lease, LeaseManager
from sidecar.metrics import Metrics, UpstreamErrorReason
from sidecar.records import CLIENT_CLOSED_REQUEST, Outcome, RequestRecord
from sidecar.rejects import RejectSampler
from sidecar.responses import error_response
from sidecar.routes import GENERATE, MODELS, NATIVE, NO_OUTPUT, POOLING, TOKENIZE, Route
from sidecar.sse import StreamScanner, UsageFinder, usage_from, usage_object, usage_of
from sidecar.tokens import estimate_prompt
from sidecar.upstream import Upstream

log = logging.getLogger("sidecar.proxy")

_ERROR_EVENT_WRITE_TIMEOUT = 5.0
_OTHER_USAGE_SHAPES = frozenset({NATIVE, GENERATE, TOKENIZE, POOLING})  # answers whose usage is not a `usage` object
_TIMEOUT_REASONS: dict[Limit, UpstreamErrorReason] = {
    "first_byte": "timeout_first_byte",
    "idle": "timeout_idle",
    "total": "timeout_total",  # counted as idle before: the enum now makes such a slip a type error
}
_BUFFERED = 1 << 20  # a non-streaming answer up to this size is sent with one write; a larger one is relayed


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
    output_budget: int = 0  # the output tokens reserved: max_tokens, or the configured default
    capture: Capture | None = None  # set when the request is audited
    response: Any = None  # the non-streaming response, kept for audit
    up: Response | None = None
    resp: web.StreamResponse | None = None
    scanner: StreamScanner | None = None
    clean: bool = False
    cors: Mapping[str, str] = field(default_factory=dict)  # CORS headers for the answer (server.cors_origins)
    sent: bool = False  # the request went to the upstream (so its prompt was the upstream's to process)
    raw: bool = False  # a plain (non-SSE) body is being relayed: a failure can only cut the connection


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
        cors: Cors | None = None,
    ) -> None:
        self.rejects = rejects
        self.cors = cors
        self.ticker = Ticker()
        self.auditor = auditor
        self.audit_cap = auditor.cap if auditor is not None else 0
        self.audit_digest_only = auditor is not None and bool(auditor.policy.paths)
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
        cors = self.cors.headers(request.headers) if self.cors is not None else {}
        try:
            if is_preflight(request):
                return await self._preflight(request, path, rec)
            route = self._check_route(request.method, path)
            principal = self.auth.known(request.headers) or await self.auth.authenticate(request.headers)
            authenticated = True
            rec.key_id = principal.key_id
            call = await self._read_call(request, route, rec)
            if self.auditor is not None:
                capture = self.auditor.capture(rec.request_id, principal.audit, request.headers, call.doc, call.body)
            if call.doc is not None or (request.method != "GET" and call.family != MODELS):
                principal.check_model(call.model)  # a body we cannot read names no model a restricted key may use
            estimate = self._estimate(call)
            lease = self.leases.acquire_now(principal, estimate.reservation) or await self.leases.acquire(
                principal, estimate.reservation
            )
            output = estimate.reservation - estimate.prompt
            ex = Exchange(call, rec, lease, estimate.prompt, output, capture=capture, cors=cors)
            return await self._relay(request, ex)
        except SidecarError as err:
            rec.fail(err.status, err.outcome, err.code)
            return error_response(err, rec.request_id, cors)
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
            # A request that ended before any key was verified costs a row only within a per-source rate.
            rejects = self.rejects
            keep = authenticated or rejects is None or rejects.keep(self.upstream.client_address(request))
            self._finish(rec.finish(), keep)
            if capture is not None:
                self._audit(capture, rec, ex)

    def _audit(self, capture: Capture, rec: RequestRecord, ex: Exchange | None) -> None:
        assert self.auditor is not None
        scanner = ex.scanner if ex is not None else None
        if scanner is not None and capture.stream is not None:
            capture.stream.fold(scanner.take_regions(), scanner.sep)
        response = ex.response if ex is not None else None
        complete = rec.outcome == Outcome.COMPLETED and (scanner is None or scanner.done)
        self.auditor.finish(capture, rec.as_row(), response, complete)

    def _check_route(self, method: str, path: str) -> Route:
        route = self.upstream.routes.get(path)
        if route is None:
            raise NotFound(f"Unknown path {path[:200]!r}.", code="unknown_url")
        if method not in route.methods:
            raise MethodNotAllowed(f"Method {method} is not allowed on {path}.", headers={"allow": route.allow})
        return route

    async def _read_call(self, request: web.Request, route: Route, rec: RequestRecord) -> Call:
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
        content_type = request.headers.get("content-type", "")
        call = parse(request.method, route, body, self.server.max_json_depth, content_type)
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
        output = 0 if call.family in NO_OUTPUT else (call.max_tokens or self.limits.default_max_tokens)
        return Estimate(prompt, prompt + output)

    async def _relay(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        cfg = self.cfg
        try:
            limits = (cfg.first_byte_timeout, cfg.stream_idle_timeout, cfg.total_timeout)
            async with Deadline(self.ticker, *limits) as deadline:
                return await self._exchange(request, ex, deadline)
        except DeadlineExpired as exc:
            self.metrics.upstream_error(_TIMEOUT_REASONS[exc.reason])
            return await self._fail(request, ex, UpstreamTimeout(f"The upstream did not answer in time ({exc})."))
        except UpstreamBroke as exc:
            self.metrics.upstream_error("dropped")
            broke = UpstreamError(f"The upstream connection broke mid-response: {exc}", code="upstream_dropped")
            return await self._fail(request, ex, broke)
        except asyncio.CancelledError:
            if not self.shutting_down or _client_gone(request):
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own shutdown cancel: end the response properly instead
            return await self._fail(request, ex, ShuttingDown("The server is shutting down; retry the request."))
        finally:
            self._settle(ex, _client_gone(request))
            if ex.up is not None:
                if ex.clean:
                    ex.up.release()
                else:  # closing (not releasing) the connection is what stops the model generating
                    ex.up.close()

    async def _exchange(self, request: web.Request, ex: Exchange, deadline: Deadline) -> web.StreamResponse:
        ex.up = up = await self._send(request, ex)
        request[RELAYED] = True
        ex.rec.upstream_status = up.status
        if up.status >= 500:
            self.metrics.upstream_error("status_5xx")
        if not _is_sse(up):
            return await self._whole(request, ex, up, deadline)
        return await self._stream(request, ex, up, deadline)

    async def _send(self, request: web.Request, ex: Exchange) -> Response:
        up = self.upstream
        target = up.target(ex.call.path, request.raw_path.partition("?")[2])
        headers = up.request_headers(request.headers, ex.rec.request_id, request.remote)
        ex.sent = True
        try:
            return await up.send(request.method, target, headers, ex.call.upstream_body())
        except ConnectFailed as exc:
            self.metrics.upstream_error("connect")
            raise UpstreamError(f"Cannot connect to the upstream: {exc}.", code="upstream_unreachable") from None
        except PoolExhausted as exc:
            busy = f"The server is at capacity ({exc}); retry shortly."
            raise Overloaded(busy, headers={"retry-after": "1"}) from None
        except UpstreamFailure as exc:
            self.metrics.upstream_error("protocol")
            raise UpstreamError(f"The upstream request failed: {exc}.") from None

    async def _whole(self, request: web.Request, ex: Exchange, up: Response, deadline: Deadline) -> web.StreamResponse:
        """A non-streaming answer. Up to `_BUFFERED` bytes it is read whole and sent with one write; a larger one
        is relayed as it arrives (`_relay_body`), so memory per request stays bounded whatever its size. The
        body follows its headers at once (generation happened before them): the first-byte limit stays."""
        limit = self.cfg.max_response_bytes
        declared = up.content_length
        if declared is not None and declared > limit:
            raise UpstreamError(f"The upstream response is {declared} bytes, over the configured limit.")
        parts: list[bytes] = []
        size = 0
        while chunk := await self._read(up.readany):
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UpstreamError(f"The upstream response is over the configured limit of {limit} bytes.")
            if size > _BUFFERED:
                return await self._relay_body(request, ex, up, parts, size, deadline)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        ex.clean = True
        rec = ex.rec
        if ex.capture is not None:
            ex.response = BodyCapture.whole(body, self.audit_cap, self.audit_digest_only)
        rec.bytes_out = len(body)
        self._whole_outcome(ex, up.status, body, whole=True)
        return web.Response(status=up.status, body=body, headers=self._headers(ex, up))

    async def _relay_body(
        self, request: web.Request, ex: Exchange, up: Response, parts: list[bytes], size: int, deadline: Deadline
    ) -> web.StreamResponse:
        """A large non-streaming body, passed on chunk by chunk (the idle limit applies between chunks); its usage
        object is found wherever it is in the body."""
        rec = ex.rec
        rec.status = up.status
        limit = self.cfg.max_response_bytes
        resp = web.StreamResponse(status=up.status, headers=self._headers(ex, up))
        if up.content_length is not None:
            resp.content_length = up.content_length
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        ex.resp, ex.raw = resp, True
        capture = BodyCapture(self.audit_cap, self.audit_digest_only) if ex.capture is not None else None
        finder = UsageFinder()
        loop = asyncio.get_running_loop()
        deadline.touch(loop.time())
        data: bytes = b"".join(parts)
        while data:
            finder.add(data)
            if capture is not None:
                capture.add(data)
            await self._write(resp, data, rec)
            data = await self._read(up.readany)
            deadline.touch(loop.time())
            size += len(data)
            if size > limit:
                raise UpstreamBroke(f"the response is over the configured limit of {limit} bytes")
        ex.clean = True
        if capture is not None:
            ex.response = capture.result()
        self._whole_outcome(ex, up.status, finder.region, whole=False)
        try:
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        return resp

    def _headers(self, ex: Exchange, up: Response) -> dict[str, str] | CIMultiDict[str]:
        headers = self.upstream.response_headers(up.headers, ex.rec.request_id)
        if "server" not in headers:
            headers["server"] = ""  # the upstream named nobody: neither does aiohttp's default
        if ex.cors:  # ours replace the upstream's
            for name in [n for n in headers if n.lower().startswith("access-control-")]:
                del headers[name]
            headers.update(ex.cors)
        headers.update(ex.lease.headers)
        return headers

    async def _preflight(self, request: web.Request, path: str, rec: RequestRecord) -> web.StreamResponse:
        """A CORS preflight: answered here when `server.cors_origins` is set, else the upstream's to answer (as
        it is: a preflight never carries a key, and asks for no work)."""
        route = self.upstream.routes.get(path)
        if route is None:
            raise NotFound(f"Unknown path {path[:200]!r}.", code="unknown_url")
        if self.cors is not None:
            resp = self.cors.preflight(request, route)
            rec.status = resp.status
            return resp
        up = self.upstream
        target = up.target(path, request.raw_path.partition("?")[2])
        headers = up.request_headers(request.headers, rec.request_id, request.remote)
        try:
            async with asyncio.timeout(self.cfg.first_byte_timeout):
                answer = await up.send("OPTIONS", target, headers, b"")
                try:
                    body = await answer.read(1 << 16)
                finally:
                    answer.close()
        except (UpstreamFailure, TimeoutError):
            raise UpstreamError("The upstream did not answer the preflight.") from None
        rec.status = rec.upstream_status = answer.status
        return web.Response(
            status=answer.status, body=body, headers=up.response_headers(answer.headers, rec.request_id)
        )

    def _whole_outcome(self, ex: Exchange, status: int, region: bytes, whole: bool) -> None:
        """Status, outcome and usage of a whole (non-streaming) answer: its `usage` object, found in `region`
        (the body, or where a relayed body's last `usage` key was); a body of another shape (llama-server's
        native `/completion`, a tokenizer's `count`) is read whole when it is (`whole`)."""
        rec = ex.rec
        rec.status = status
        if status >= 500:
            rec.outcome, rec.error_code = Outcome.UPSTREAM_ERROR, "upstream_status"
        elif status < 300:
            rec.mark_first_token()  # a whole body: its tokens reach the client all at once, now
            usage = usage_from(usage_object(region))
            if usage is None and whole and ex.call.family in _OTHER_USAGE_SHAPES:
                try:
                    usage = usage_of(orjson.loads(region))
                except orjson.JSONDecodeError:
                    usage = None
            if usage is not None:
                completion = usage.completion_tokens
                if completion is None and ex.call.family in NO_OUTPUT:
                    completion = 0  # nothing is generated there: a count of input tokens is all of it
                rec.set_usage(usage.prompt_tokens, completion, usage.cached_tokens, "upstream")
            ex.lease.settle(rec.prompt_tokens, rec.completion_tokens)

    async def _stream(self, request: web.Request, ex: Exchange, up: Response, deadline: Deadline) -> web.StreamResponse:
        rec = ex.rec
        call = ex.call
        audit = ex.capture
        ex.scanner = scanner = StreamScanner(call.wants_hidden_usage, audit is not None, call.family, call.tools)
        if audit is not None:
            audit.stream = StreamCapture(self.audit_cap)
        read = up.readany
        loop = asyncio.get_running_loop()
        chunk = await self._read(read)
        deadline.touch(loop.time())
        resp = web.StreamResponse(status=up.status, headers=self._headers(ex, up))
        rec.status = up.status
        if up.status >= 500:  # an error, even when it comes as a stream
            rec.outcome, rec.error_code = Outcome.UPSTREAM_ERROR, "upstream_status"
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        ex.resp = resp
        while chunk:
            rec.chunks += 1
            data = scanner.feed(chunk)
            if audit is not None and scanner.kept > StreamCapture.FOLD_BYTES:
                assert audit.stream is not None
                audit.stream.fold(scanner.take_regions(), scanner.sep)
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

    async def _fail(self, request: web.Request, ex: Exchange, err: SidecarError) -> web.StreamResponse:
        """An upstream failure: a JSON error before the answer started, a terminal SSE event after in a stream;
        in a plain body that started there is no way to say it but to cut the connection short."""
        if ex.resp is None:
            raise err
        ex.rec.outcome, ex.rec.error_code = err.outcome, err.code
        if ex.raw:
            if request.transport is not None:
                request.transport.abort()  # the client sees a truncated body, never a complete-looking one
            return ex.resp
        try:
            async with asyncio.timeout(_ERROR_EVENT_WRITE_TIMEOUT):
                await ex.resp.write(sse_error_event(err))
                await ex.resp.write_eof()
        except (TimeoutError, ConnectionError, aiohttp.ClientConnectionError):
            pass  # the client is gone or stuck too; the record already says why the stream ended
        return ex.resp

    def _settle(self, ex: Exchange, gone: bool) -> None:
        """Usage for a stream: the upstream's usage event, else the output deltas counted so far. A client gone
        before any usage was known is charged at least what its body proves: the prompt the upstream got."""
        scanner = ex.scanner
        rec = ex.rec
        if scanner is None:
            if gone and ex.sent and rec.usage_source == "none":
                # A whole answer that had started was generated in full before it was sent: without its usage
                # object, the output budget is what the client may have used.
                output = ex.output_budget if ex.raw else 0
                rec.set_usage(ex.prompt_estimate or None, output, None, "counted")
                ex.lease.settle(rec.prompt_tokens, rec.completion_tokens)
            return
        if scanner.usage is not None:
            u = scanner.usage
            rec.set_usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens, "upstream")
        else:
            rec.set_usage(ex.prompt_estimate or None, scanner.deltas, None, "counted")
        ex.lease.settle(rec.prompt_tokens, rec.completion_tokens)
