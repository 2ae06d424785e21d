"""The proxied routes' handler: the pipeline a request takes, and nothing else.

    route -> key -> call (body) -> audit decision -> model check -> lease -> relay (`sidecar.relay`)

Each step raises an OpenAI-shaped error (`sidecar.errors`) that ends the request with its status and its
record; whatever happens, the request's `Exchange` releases what it holds, in one documented order, and
finishes exactly one record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace

import aiohttp
from aiohttp import web

from sidecar.audit.capture import Auditor
from sidecar.config import ServerCfg
from sidecar.cors import Cors, is_preflight
from sidecar.edge import read_body
from sidecar.errors import (
    KeyNotValid,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    SidecarError,
    UnsupportedMediaType,
)
from sidecar.exchange import Admission, Exchange, client_gone
from sidecar.inflight import InFlight
from sidecar.keys.auth import Authenticator, Principal
from sidecar.keys.salts import CacheSalts
from sidecar.limits.admission import Limits
from sidecar.ops.metrics import Metrics
from sidecar.ops.rejects import RejectSampler
from sidecar.ops.tracing import Tracing
from sidecar.records.record import CLIENT_CLOSED_REQUEST, RequestRecord
from sidecar.relay import Relay
from sidecar.responses import ClientGone, KeptAlive, end_stream, error_response
from sidecar.upstream.server import Upstream
from sidecar.wire.body import ENGINE_PRIORITY, Call, forwarded_priority, parse
from sidecar.wire.headers import Forwarding, clean_text
from sidecar.wire.routes import ENGINE_FIELDS, MODELS, Route, speaks_anthropic


class Proxy:
    def __init__(
        self,
        upstream: Upstream,
        forwarding: Forwarding,
        server: ServerCfg,
        limits: Limits,
        auth: Authenticator,
        metrics: Metrics,
        finish: Callable[[RequestRecord, bool], None],
        auditor: Auditor | None = None,
        rejects: RejectSampler | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.upstream = upstream
        self.forwarding = forwarding
        self.cfg = upstream.cfg
        self.server = server
        self.limits = limits
        self.auth = auth
        self.salts = CacheSalts(auth.pepper) if self.cfg.cache_salt == "key" else None  # None: off
        self.metrics = metrics
        self.auditor = auditor
        self.rejects = rejects
        self.cors = Cors(server.cors_origins) if server.cors_origins else None
        self.tracing = tracing  # None: off, and nothing of OpenTelemetry is touched
        self._finish = finish
        self.access_log = server.access_log  # the access line names the client and its user agent
        self.in_flight = InFlight()
        cap = auditor.cap if auditor is not None else 0
        self.relay = Relay(
            upstream, forwarding, metrics, self.in_flight, cap, auditor is not None and bool(auditor.policy.paths),
            tracing, server.overhead_header,
        )  # fmt: skip

    def close(self) -> None:
        """At shutdown, after the drain: the relay's deadline ticker stops."""
        self.relay.ticker.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        # The client's strings are made valid text here, once: the row, the log line and the audit take them as is.
        client_id = clean_text(request.headers.get("x-request-id", ""), 128) or None
        rec = RequestRecord.start(request.method, clean_text(path, 256), client_id)
        if self.access_log:
            rec.client_addr = self.forwarding.client_address(request)
            rec.user_agent = clean_text(request.headers.get("user-agent", ""), 256) or None
        cors = self.cors.headers(request.headers) if self.cors is not None else {}
        anthropic = speaks_anthropic(path)  # our own errors in the shape the client's SDK parses
        if self.tracing is not None:
            matched = self.upstream.routes.match(path)
            known = matched.path if matched is not None else None  # span names stay bounded: a template's own
            rec.span = self.tracing.begin(request.headers, request.method, known, int(rec.started_at * 1e9))
        self.metrics.in_flight += 1
        try:
            async with (
                self.in_flight.track(),
                Exchange(request, rec, self._finish, self._keep, self.auditor, cors) as ex,
            ):
                try:
                    return await self._pipeline(request, path, ex)
                except SidecarError as err:
                    rec.fail(err.status, err.outcome, err.code)
                    if isinstance(err, RateLimited):
                        self.metrics.limited(err.reason, rec.key_id)
                    if isinstance(err, KeyNotValid):
                        rec.key_id = err.key_id  # a revoked or expired key: whose it was is known
                    if ex.resp is not None:  # a kept-alive stream refused in the queue: its 200 is sent
                        return await end_stream(request, ex.resp, err, anthropic)
                    answer = error_response(err, rec.request_id, cors, anthropic)
                    if isinstance(err, ShuttingDown):
                        answer.force_close()  # a kept-alive connection must not bring more work to a drained proxy
                    return answer
                except asyncio.CancelledError:  # a shutdown before the answer started (queued, reading the body)
                    if (stop := self.in_flight.shutdown_cancel(client_gone(request))) is None:
                        raise
                    rec.fail(stop.status, stop.outcome, stop.code)
                    if ex.resp is not None:  # a kept-alive stream still queued
                        return await end_stream(request, ex.resp, stop, anthropic)
                    return error_response(stop, rec.request_id, cors, anthropic)
                except ClientGone:
                    ex.ended_early()
                    return web.Response(status=CLIENT_CLOSED_REQUEST)  # aiohttp drops it: the socket is closed
        finally:
            self.metrics.in_flight -= 1

    async def _pipeline(self, request: web.Request, path: str, ex: Exchange) -> web.StreamResponse:
        if self.in_flight.shutting_down:  # drained (`POST /drain`), still running: nothing new may start
            raise ShuttingDown("The server is shutting down; retry the request.")
        if is_preflight(request):
            return self._preflight(request, path, ex.rec)
        route = self._check_route(request.method, path)
        principal = self.auth.known(request.headers) or await self._authenticate(request)
        ex.authenticated = True
        ex.rec.key_id = principal.key_id
        call = await self._read_call(request, route, path, ex.rec)
        if self.auditor is not None:
            ex.capture = self.auditor.capture(ex.rec.request_id, principal.audit, request.headers, call.doc, call.body)
        if call.doc is not None or (request.method != "GET" and call.family != MODELS):
            principal.check_model(call.model)  # a body we cannot read names no model a restricted key may use
        ex.admission = await self._admit(principal, call, ex, request)
        if ex.rec.span is not None and self.tracing is not None:
            self.tracing.admitted(ex.rec.span, call.family, call.model, call.max_tokens, ex.rec.queued_ms, call.doc)
        return await self.relay.relay(request, ex)

    async def _authenticate(self, request: web.Request) -> Principal:
        """The key's principal; the client's address bounds its lookups of unknown keys (`keys.auth`)."""
        return await self.auth.authenticate(request.headers, self.forwarding.client_address(request))

    async def _admit(self, principal: Principal, call: Call, ex: Exchange, request: web.Request) -> Admission:
        call = self._engine_fields(principal, call)
        context = await self.upstream.models.context(call.model) if self.limits.needs_context(call) else None
        reservation = self.limits.reserve(call, context)
        if reservation.cap is not None:
            call = call.capped(reservation.cap)
        keepalive = None
        if call.stream and (interval := self.server.sse_keepalive):  # made here; it runs only if the request queues
            keepalive = KeptAlive(request, ex, interval, lambda: self.limits.headers(principal))
        lease = await self.limits.admit(principal, reservation, ex.rec.queued, keepalive)
        return Admission(call, lease, reservation.prompt, reservation.output)

    def _engine_fields(self, principal: Principal, call: Call) -> Call:
        """vLLM's `priority` from the key's class (`limits.forward_priority`) and its prefix-cache salt
        (`upstream.cache_salt`), set in the bodies vLLM reads them from; the call as it is when both are off."""
        if call.doc is None or call.family not in ENGINE_FIELDS:
            return call
        fields: dict[str, object] = {}
        if self.limits.cfg.forward_priority:
            fields["priority"] = forwarded_priority(call.doc, ENGINE_PRIORITY.get(principal.priority, 0))
        if self.salts is not None and (salt := self.salts.salt(principal)) is not None:
            fields["cache_salt"] = salt
        return call.with_fields(**fields) if fields else call

    def _keep(self, request: web.Request) -> bool:
        """A request that ended before any key was verified costs a row only within a per-source rate."""
        return self.rejects is None or self.rejects.keep(self.forwarding.client_address(request))

    def _check_route(self, method: str, path: str) -> Route:
        route = self.upstream.routes.match(path)
        if route is None:
            raise NotFound(f"Unknown path {path[:200]!r}.", code="unknown_url")
        if method not in route.methods:
            raise MethodNotAllowed(f"Method {method} is not allowed on {path}.", headers={"allow": route.allow})
        return route

    async def _read_call(self, request: web.Request, route: Route, path: str, rec: RequestRecord) -> Call:
        limit = self.server.max_body_bytes
        encoding = request.headers.get("content-encoding")
        if encoding and encoding.strip().lower() != "identity":
            raise UnsupportedMediaType("Compressed request bodies are not accepted; send identity encoding.")
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
        began = time.monotonic()
        try:
            body = await read_body(request)
        except (ConnectionError, aiohttp.ClientError):
            raise ClientGone from None
        rec.upload_ms = (time.monotonic() - began) * 1000.0
        rec.bytes_in = len(body)
        call = parse(request.method, route, body, self.server.max_json_depth)
        if call.path != path:  # a template's route: forwarded to the path asked for, never to the template
            call = replace(call, path=path)
        rec.model = call.model
        rec.stream = call.stream
        return call

    def _preflight(self, request: web.Request, path: str, rec: RequestRecord) -> web.StreamResponse:
        """A CORS preflight, always answered here: 204 for an origin in `server.cors_origins`, else 403 (every
        origin, when none is configured). Never relayed: it carries no key, and the upstream would get it with
        its own key, outside every limit."""
        route = self.upstream.routes.match(path)
        if route is None:
            raise NotFound(f"Unknown path {path[:200]!r}.", code="unknown_url")
        resp = (self.cors or Cors(())).preflight(request, route)
        rec.status = resp.status
        return resp
