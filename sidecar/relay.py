"""Relay: an admitted request to the upstream, and its answer to the client, as it arrives.

Before the first byte reaches the client an error is an OpenAI-shaped JSON response (Anthropic-shaped on its
Messages API's paths); after it, a stream ends with an SSE `error` event in the same shape and no `[DONE]` (so
a client can tell a cut stream from a finished one), and a plain body is cut short. A whole (non-streaming)
answer up to `BUFFERED` bytes is sent in one write; a larger one is relayed as it arrives, so memory per request
is bounded whatever the size of the answer. Usage is read from whatever the answer carries; time limits are the
upstream deadlines (first byte, idle, total).

A stream that waited in the dispatch queue longer than `server.sse_keepalive` has its answer started already
(`KeptAlive`: 200, SSE comments while it waits): the upstream's stream goes into it, and an answer that cannot
(an error status, a whole body) ends it with an error event, the row saying what the upstream answered.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from sidecar.audit.aggregate import StreamCapture
from sidecar.audit.capture import BodyCapture
from sidecar.config import UpstreamCfg
from sidecar.edge import RELAYED, RelayedResponse, RelayedStream
from sidecar.errors import SidecarError, UpstreamError, failure
from sidecar.exchange import Exchange, client_gone
from sidecar.inflight import InFlight
from sidecar.ops.metrics import Metrics
from sidecar.ops.tracing import Tracing
from sidecar.records.record import Outcome, RequestRecord
from sidecar.responses import ClientGone, abort, answer_error, end_stream, write
from sidecar.upstream.deadline import Deadline, DeadlineExpired, Ticker
from sidecar.upstream.response import UpstreamBroke, UpstreamFailure, UpstreamResponse
from sidecar.upstream.server import Upstream
from sidecar.wire.headers import Forwarding, to_client
from sidecar.wire.routes import GENERATE, NATIVE, NO_OUTPUT, POOLING, TOKENIZE, UNCHARGED, speaks_anthropic
from sidecar.wire.sse import StreamScanner
from sidecar.wire.usage import UsageFinder, usage_from, usage_object, usage_of

BUFFERED = 1 << 20  # a non-streaming answer up to this size is sent with one write; a larger one is relayed
_OTHER_USAGE_SHAPES = frozenset({NATIVE, GENERATE, TOKENIZE, POOLING})  # answers whose usage is not a `usage` object


def _direct(resp: web.StreamResponse) -> StreamWriter | None:
    """aiohttp's writer of a started answer when the relay may put bytes on the client's transport itself: its
    headers are out, and all it would do to a chunk is frame it (no compression, no declared length, no hooks).
    A relayed stream always is; anything else keeps aiohttp's write."""
    w = resp._payload_writer
    if type(w) is not StreamWriter or not w._headers_written or w._compress is not None or w.length is not None:
        return None
    return w if w._on_chunk_sent is None and w.on_body_write is None else None


def _send(writer: StreamWriter, data: bytes) -> bool:
    """`data` onto the client's transport, framed as aiohttp frames it, in one call: aiohttp's write is three
    coroutines, a format and a join per chunk, and ~66 chunks make a stream. Returns whether the transport is
    paused (its buffer over the high-water mark: the client reads slower than the upstream writes)."""
    if data:
        transport = writer.transport
        if transport is None or transport.is_closing():
            raise ClientGone
        framed = b"%x\r\n%b\r\n" % (len(data), data) if writer.chunked else data
        transport.write(framed)
        writer.output_size += len(framed)  # aiohttp's count, which the access log reads at the end
    return writer.protocol.writing_paused


async def _drain(writer: StreamWriter) -> None:
    """Waits until the client's transport takes more (aiohttp's write waits only every 64 KiB written; this
    waits whenever the transport is paused, so a slow client holds less in the proxy, never more)."""
    try:
        await writer.drain()
    except (ConnectionError, aiohttp.ClientConnectionError):
        raise ClientGone from None


def _cut(request: web.Request, ex: Exchange) -> web.StreamResponse:
    """A deadline or our own drain's cancel during the write that ends a complete answer (a client that stopped
    reading): the row is made and stays as it is (the upstream's answer was whole, the usage its own); the
    connection is cut, with no error event after the answer's end, and nothing is counted against the upstream."""
    abort(request)
    assert ex.resp is not None, "concluded before the answer started"
    return ex.resp


def _is_sse(up: UpstreamResponse) -> bool:
    return up.headers.get("content-type", "").startswith("text/event-stream")


# What a trace's span says of an answer (read only when tracing is on; a match split across reads is missed).
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z_]{1,32})"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')


class Relay:
    def __init__(
        self,
        upstream: Upstream,
        forwarding: Forwarding,
        metrics: Metrics,
        in_flight: InFlight,
        audit_cap: int,
        digest_only: bool,
        tracing: Tracing | None = None,
        overhead_header: bool = False,
    ) -> None:
        self.upstream = upstream
        self.forwarding = forwarding
        self.cfg: UpstreamCfg = upstream.cfg
        self.metrics = metrics
        self.in_flight = in_flight
        self.ticker = Ticker()
        self.audit_cap = audit_cap
        self.audit_digest_only = digest_only  # redact_paths are set: a raw body prefix cannot be kept
        self.tracing = tracing
        self.overhead_header = overhead_header

    async def relay(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        cfg = self.cfg
        try:
            limits = (cfg.first_byte_timeout, cfg.stream_idle_timeout, cfg.total_timeout)
            async with Deadline(self.ticker, *limits) as deadline:
                # One coroutine from here to the connection pool: each level an answer's wake-up passes through
                # costs every request a little (the exchange and the send were theirs once).
                try:
                    ex.up = up = await self._send(request, ex)
                except UpstreamFailure as exc:
                    raise self._failed(exc) from None
                request[RELAYED] = True
                ex.rec.upstream_status = up.status
                if up.status >= 500:
                    self.metrics.upstream_error("status_5xx")
                if ex.resp is not None and (up.status >= 300 or not _is_sse(up)):
                    return await self._as_event(request, ex, up)  # a kept-alive stream: its status was sent already
                if not _is_sse(up):
                    return await self._whole(request, ex, up, deadline)
                return await self._stream(request, ex, up, deadline)
        except (DeadlineExpired, UpstreamBroke) as exc:
            if ex.concluded:  # the answer was complete and its row made: only its last write to the client hung
                return _cut(request, ex)
            return await self._fail(request, ex, self._failed(exc))
        except asyncio.CancelledError:
            if (stop := self.in_flight.shutdown_cancel(client_gone(request))) is None:
                raise
            if ex.concluded:
                return _cut(request, ex)
            return await self._fail(request, ex, stop)  # our own shutdown cancel: end the response properly

    def _send(self, request: web.Request, ex: Exchange) -> Awaitable[UpstreamResponse]:
        """The request to the upstream, sent when awaited (its head is in when that returns)."""
        up = self.upstream
        target = up.target(ex.admitted.call.path, request.raw_path.partition("?")[2])
        fw = self.forwarding
        headers = fw.to_upstream(request.headers, request.raw_headers, ex.rec.request_id, request.remote)
        if ex.rec.span is not None and self.tracing is not None:
            self.tracing.inject(ex.rec.span, headers)  # the model server's spans join this trace
        ex.rec.sent_at = time.monotonic()
        return up.send(request.method, target, headers, ex.admitted.call.upstream_body())

    def _failed(self, exc: Exception) -> SidecarError:
        """A transport failure as the client sees it (`sidecar.errors.failure`), counted by its reason."""
        failed = failure(exc)
        if failed.reason is not None:
            self.metrics.upstream_error(failed.reason)
        return failed.error

    async def _whole(
        self, request: web.Request, ex: Exchange, up: UpstreamResponse, deadline: Deadline
    ) -> web.StreamResponse:
        """A non-streaming answer. Up to `BUFFERED` bytes it is read whole and sent with one write; a larger one
        is relayed as it arrives (`_relay_body`), so memory per request stays bounded whatever its size. The
        body follows its headers at once (generation happened before them): the first-byte limit stays."""
        limit = self.cfg.max_response_bytes
        declared = up.content_length
        if declared is not None and declared > limit:
            raise UpstreamError(f"The upstream response is {declared} bytes, over the configured limit.")
        if up.ended and up.pending <= min(limit, BUFFERED):  # in whole with its head: nothing to wait for
            body = up.take()
        else:
            parts: list[bytes] = []
            size = 0
            while chunk := await self._read(up.readany):
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise UpstreamError(f"The upstream response is over the configured limit of {limit} bytes.")
                if size > BUFFERED:
                    return await self._relay_body(request, ex, up, parts, size, deadline)
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        rec = ex.rec
        rec.upstream_done = time.monotonic()
        if rec.span is not None and rec.span.is_recording():
            _answer_facts(rec, body)
            if self.tracing is not None and self.tracing.content is not None and up.status < 300:
                rec.output = _choices(body)
        if ex.capture is not None:
            ex.response = BodyCapture.whole(body, self.audit_cap, self.audit_digest_only)
        rec.bytes_out = len(body)
        self._whole_outcome(ex, up.status, body, whole=True)
        return RelayedResponse(status=up.status, body=body, headers=self._headers(ex, up))

    async def _relay_body(
        self,
        request: web.Request,
        ex: Exchange,
        up: UpstreamResponse,
        parts: list[bytes],
        size: int,
        deadline: Deadline,
    ) -> web.StreamResponse:
        """A large non-streaming body, passed on chunk by chunk (the idle limit applies between chunks); its usage
        object is found wherever it is in the body."""
        rec = ex.rec
        rec.status = up.status
        limit = self.cfg.max_response_bytes
        resp = RelayedStream(status=up.status, headers=self._headers(ex, up))
        if up.content_length is not None:
            resp.content_length = up.content_length
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError):
            raise ClientGone from None
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
            if up.ended and not up.pending:
                break  # the last of it: written with the end of the answer, after the row
            await write(resp, data, rec)
            data = await self._read(up.readany)
            deadline.touch(loop.time())
            size += len(data)
            if size > limit:
                raise UpstreamBroke(f"the response is over the configured limit of {limit} bytes")
        rec.upstream_done = time.monotonic()
        if capture is not None:
            ex.response = capture.result()
        self._whole_outcome(ex, up.status, finder.region, whole=False)
        rec.bytes_out += len(data)
        ex.conclude(client_gone(request))  # the row, journaled before the client can have the end of the answer
        try:
            await resp.write_eof(data)
        except (ConnectionError, aiohttp.ClientConnectionError):
            raise ClientGone from None
        return resp

    def _headers(self, ex: Exchange, up: UpstreamResponse) -> CIMultiDict[str]:
        headers = to_client(up.headers, ex.rec.request_id)
        if ex.cors:  # ours replace the upstream's
            for name in [n for n in headers if n.lower().startswith("access-control-")]:
                headers.popall(name, None)  # every spelling at once: a later one of the list is gone by then
            headers.update(ex.cors)
        headers.update(ex.admitted.lease.headers)
        if self.overhead_header:
            rec = ex.rec
            before = rec.sent_at - rec.t0 - (rec.queued_ms + rec.upload_ms) / 1000.0
            headers["x-sidecar-overhead-ms"] = f"{max(0.0, before) * 1000.0:.3f}"
        return headers

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
            if usage is None and whole and ex.admitted.call.family in _OTHER_USAGE_SHAPES:
                try:
                    usage = usage_of(orjson.loads(region))
                except orjson.JSONDecodeError:
                    usage = None
            if usage is not None and ex.admitted.call.family not in UNCHARGED:
                completion = usage.completion_tokens
                if completion is None and ex.admitted.call.family in NO_OUTPUT:
                    completion = 0  # nothing is generated there: a count of input tokens is all of it
                rec.set_usage(
                    usage.prompt_tokens,
                    completion,
                    usage.cached_tokens,
                    "upstream",
                    usage.cache_write_tokens,
                    usage.reasoning_tokens,
                )

    async def _stream(
        self, request: web.Request, ex: Exchange, up: UpstreamResponse, deadline: Deadline
    ) -> web.StreamResponse:
        rec = ex.rec
        call = ex.admitted.call
        audit = ex.capture
        ex.scanner = scanner = StreamScanner(call.wants_hidden_usage, audit is not None, call.family, call.tools)
        if audit is not None:
            audit.stream = StreamCapture(self.audit_cap, call.family)
        chunk = await self._read(up.readany)
        deadline.touch(asyncio.get_running_loop().time())
        rec.status = up.status
        if up.status >= 500:  # an error, even when it comes as a stream
            rec.outcome, rec.error_code = Outcome.UPSTREAM_ERROR, "upstream_status"
        resp = ex.resp or await self._start_stream(request, ex, up)
        held = await self._events(resp, ex, up, chunk, deadline)
        rec.upstream_done = time.monotonic()
        held.append(scanner.flush())
        last = b"".join(held)
        rec.bytes_out += len(last)
        ex.conclude(client_gone(request))  # the row, journaled before the client can have the end of the answer
        try:
            await resp.write_eof(last)  # the last events and the terminating chunk: one write
        except (ConnectionError, aiohttp.ClientConnectionError):
            raise ClientGone from None  # closed before the end of the answer
        return resp

    async def _events(
        self, resp: web.StreamResponse, ex: Exchange, up: UpstreamResponse, chunk: bytes, deadline: Deadline
    ) -> list[bytes]:
        """Relays a stream's events as they arrive, one write per upstream read, until the upstream's body ends.
        Once the client's transport has the answer's headers, the bytes go to it directly (`_direct`, `_send`).
        From the moment the upstream's whole body is in (`up.ended`: no read waits any more), what is left is
        returned instead, to go out with the end of the answer in the same write."""
        rec, audit = ex.rec, ex.capture
        scanner = ex.scanner
        assert scanner is not None
        read = up.readany
        now = asyncio.get_running_loop().time
        facts = rec.span is not None and rec.span.is_recording()
        writer: StreamWriter | None = None
        held: list[bytes] = []
        while chunk:
            rec.chunks += 1
            if facts:
                _answer_facts(rec, chunk)
            data = scanner.feed(chunk)
            if audit is not None and scanner.kept > StreamCapture.FOLD_BYTES:
                assert audit.stream is not None
                audit.stream.fold(scanner.take_regions(), scanner.sep)
            if rec.ttft_ms is None and scanner.first_output:
                rec.mark_first_token()
            if up.ended:
                held.append(data)
            elif writer is not None:
                if _send(writer, data):
                    await _drain(writer)
                rec.bytes_out += len(data)
            elif data:
                await write(resp, data, rec)  # aiohttp's write: the headers go with the first bytes
                writer = _direct(resp)
            try:
                chunk = await read()
            except UpstreamFailure as exc:
                raise UpstreamBroke(str(exc)) from None
            deadline.touch(now())
        return held

    async def _start_stream(self, request: web.Request, ex: Exchange, up: UpstreamResponse) -> web.StreamResponse:
        resp = RelayedStream(status=up.status, headers=self._headers(ex, up))
        try:
            await resp.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionError):
            raise ClientGone from None
        ex.resp = resp
        return resp

    async def _as_event(self, request: web.Request, ex: Exchange, up: UpstreamResponse) -> web.StreamResponse:
        """The upstream's answer to a stream whose SSE answer started while it waited (`KeptAlive`), when it is not
        a 2xx stream: an error event ends the stream. The row says what the upstream answered, as it would have
        (its status, usage, outcome); a whole 2xx answer where a stream was asked for is a 502 `upstream_error`.
        At most `BUFFERED` bytes of it are read: enough for an error, and for a whole answer's usage."""
        parts: list[bytes] = []
        size = 0
        while size <= BUFFERED and (chunk := await self._read(up.readany)):
            parts.append(chunk)
            size += len(chunk)
        body = b"".join(parts)
        ex.rec.upstream_done = time.monotonic()
        if ex.capture is not None:
            ex.response = BodyCapture.whole(body, self.audit_cap, self.audit_digest_only)
        self._whole_outcome(ex, up.status, body, whole=True)
        err = answer_error(up.status, body)
        if up.status < 300:
            ex.rec.fail(err.status, err.outcome, err.code)
        assert ex.resp is not None
        return await end_stream(request, ex.resp, err, speaks_anthropic(ex.admitted.call.path))

    @staticmethod
    async def _read(read: Callable[[], Any]) -> bytes:
        try:
            chunk: bytes = await read()
        except UpstreamFailure as exc:
            raise UpstreamBroke(str(exc)) from None
        return chunk

    async def _fail(self, request: web.Request, ex: Exchange, err: SidecarError) -> web.StreamResponse:
        """An upstream failure: a JSON error before the answer started, a terminal SSE event after in a stream;
        in a plain body that started there is no way to say it but to cut the connection short."""
        if ex.resp is None:
            raise err
        ex.rec.outcome, ex.rec.error_code = err.outcome, err.code
        if not ex.rec.status:  # a kept-alive stream that the upstream never answered: its 200 said nothing yet
            ex.rec.status = err.status
        if ex.raw:
            abort(request)  # the client sees a truncated body, never a complete-looking one
            return ex.resp
        return await end_stream(request, ex.resp, err, speaks_anthropic(ex.admitted.call.path))


def _answer_facts(rec: RequestRecord, data: bytes) -> None:
    """The answering model and the finish reasons, for the trace span."""
    if rec.response_model is None and (model := _MODEL.search(data)) is not None:
        rec.response_model = model.group(1).decode("utf-8", "replace")
    for reason in _FINISH_REASON.findall(data):
        text = reason.decode()
        if text not in rec.finish_reasons:
            rec.finish_reasons = (*rec.finish_reasons, text)


def _choices(body: bytes) -> Any:
    """A whole answer's `choices` (for a span's content, when the operator opted in), or None."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc.get("choices") if isinstance(doc, dict) else None
