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
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from sidecar.allowances import Hold
from sidecar.audit import Auditor
from sidecar.auth import Authenticator, Principal
from sidecar.budgets import Budgets
from sidecar.calls import Call, parse
from sidecar.config import LimitsCfg, ServerCfg
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
    UpstreamError,
)
from sidecar.exchange import Admission, Exchange, client_gone
from sidecar.inflight import InFlight
from sidecar.leases import LeaseManager
from sidecar.metrics import Metrics
from sidecar.rates import SharedRates
from sidecar.records import CLIENT_CLOSED_REQUEST, RequestRecord
from sidecar.rejects import RejectSampler
from sidecar.relay import ClientGone, Relay
from sidecar.responses import error_response
from sidecar.routes import MODELS, NO_OUTPUT, Route
from sidecar.slots import SharedSlots
from sidecar.tokens import estimate_prompt
from sidecar.tracing import Tracing
from sidecar.upstream import Upstream
from sidecar.upstream.pool import UpstreamFailure


@dataclass(frozen=True, slots=True)
class Estimate:
    prompt: int
    reservation: int


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
        budgets: Budgets,
        rates: SharedRates | None = None,
        slots: SharedSlots | None = None,
        auditor: Auditor | None = None,
        rejects: RejectSampler | None = None,
        cors: Cors | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.upstream = upstream
        self.cfg = upstream.cfg
        self.server = server
        self.limits = limits
        self.auth = auth
        self.leases = leases
        self.budgets = budgets
        self.rates = rates  # None with SQLite: one replica, the local buckets are the whole truth
        self.slots = slots  # likewise for concurrency
        self.metrics = metrics
        self.auditor = auditor
        self.rejects = rejects
        self.cors = cors
        self.tracing = tracing  # None: off, and nothing of OpenTelemetry is touched
        self._finish = finish
        self.access_log = server.access_log  # the access line names the client and its user agent
        self.in_flight = InFlight()
        cap = auditor.cap if auditor is not None else 0
        self.relay = Relay(
            upstream, metrics, self.in_flight, cap, auditor is not None and bool(auditor.policy.paths), tracing,
            server.overhead_header,
        )  # fmt: skip

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        client_id = request.headers.get("x-request-id")
        rec = RequestRecord.start(request.method, path[:256], client_id[:128] if client_id else None)
        if self.access_log:
            rec.client_addr = self.upstream.client_address(request)
            agent = request.headers.get("user-agent")
            rec.user_agent = agent[:256] if agent else None
        cors = self.cors.headers(request.headers) if self.cors is not None else {}
        if self.tracing is not None:
            known = path if path in self.upstream.routes else None  # span names stay bounded
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
                        self.metrics.limited(err.reason)
                    if isinstance(err, KeyNotValid):
                        rec.key_id = err.key_id  # a revoked or expired key: whose it was is known
                    answer = error_response(err, rec.request_id, cors)
                    if isinstance(err, ShuttingDown):
                        answer.force_close()  # a kept-alive connection must not bring more work to a drained proxy
                    return answer
                except asyncio.CancelledError:  # a shutdown before the answer started (queued, reading the body)
                    if (stop := self.in_flight.shutdown_cancel(client_gone(request))) is None:
                        raise
                    rec.fail(stop.status, stop.outcome, stop.code)
                    return error_response(stop, rec.request_id, cors)
                except ClientGone:
                    ex.ended_early()
                    return web.Response(status=CLIENT_CLOSED_REQUEST)  # aiohttp drops it: the socket is closed
        finally:
            self.metrics.in_flight -= 1

    async def _pipeline(self, request: web.Request, path: str, ex: Exchange) -> web.StreamResponse:
        if self.in_flight.shutting_down:  # drained (`POST /drain`), still running: nothing new may start
            raise ShuttingDown("The server is shutting down; retry the request.")
        if is_preflight(request):
            return await self._preflight(request, path, ex.rec)
        route = self._check_route(request.method, path)
        principal = self.auth.known(request.headers) or await self.auth.authenticate(request.headers)
        ex.authenticated = True
        ex.rec.key_id = principal.key_id
        call = await self._read_call(request, route, ex.rec)
        if self.auditor is not None:
            ex.capture = self.auditor.capture(ex.rec.request_id, principal.audit, request.headers, call.doc, call.body)
        if call.doc is not None or (request.method != "GET" and call.family != MODELS):
            principal.check_model(call.model)  # a body we cannot read names no model a restricted key may use
        ex.admission = await self._admit(principal, call, ex.rec)
        if ex.rec.span is not None and self.tracing is not None:
            self.tracing.admitted(ex.rec.span, call.family, call.model, call.max_tokens, ex.rec.queued_ms, call.doc)
        return await self.relay.relay(request, ex)

    async def _admit(self, principal: Principal, call: Call, rec: RequestRecord) -> Admission:
        estimate = self._estimate(call)
        slot = None
        if self.slots is not None and principal.concurrency and principal.key_id is not None:
            slot = await self.slots.take(principal.key_id, principal.concurrency)
        holds: list[Hold] = []
        admitted = False
        try:
            await self._shared_holds(principal, estimate.reservation, holds)
            leases = self.leases
            lease = leases.acquire_now(principal, estimate.reservation)
            if lease is None:  # it waits for a slot: that time is reported apart from the sidecar's own
                began = time.monotonic()
                try:
                    lease = await leases.acquire(principal, estimate.reservation)
                finally:
                    rec.queued_ms = (time.monotonic() - began) * 1000.0
            admitted = True
        except RateLimited as exc:
            if self.rates is not None:  # the figures for the whole deployment, not this replica's
                self.rates.headers(principal, exc.headers)
            raise
        finally:
            if not admitted:  # refused (or cancelled while queued) after something was taken: nothing was used
                for hold in holds:
                    hold.settle(0)
                if slot is not None:
                    slot.release()
        lease.holds, lease.slot = tuple(holds), slot
        if self.rates is not None:
            self.rates.headers(principal, lease.headers)
        return Admission(call, lease, estimate.prompt, estimate.reservation - estimate.prompt)

    async def _shared_holds(self, principal: Principal, reservation: int, holds: list[Hold]) -> None:
        """The key's budget, then (replicas sharing PostgreSQL) its minute limits for the whole deployment, into
        `holds` as each is taken (the caller gives them back when admission fails)."""
        kid, budget, period = principal.key_id, principal.budget_tokens, principal.budget_period
        if kid is not None and budget is not None and period:
            holds.append(await self.budgets.reserve(kid, budget, period, reservation))
        if self.rates is not None and (tokens := await self.rates.take(principal, reservation)) is not None:
            holds.append(tokens)

    def _keep(self, request: web.Request) -> bool:
        """A request that ended before any key was verified costs a row only within a per-source rate."""
        return self.rejects is None or self.rejects.keep(self.upstream.client_address(request))

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
        began = time.monotonic()
        try:
            body = await read_body(request)
        except (ConnectionError, aiohttp.ClientError):
            raise ClientGone from None
        rec.upload_ms = (time.monotonic() - began) * 1000.0
        rec.bytes_in = len(body)
        content_type = request.headers.get("content-type", "")
        call = parse(request.method, route, body, self.server.max_json_depth, content_type)
        rec.model = call.model
        rec.stream = call.stream
        return call

    def _estimate(self, call: Call) -> Estimate:
        if call.doc is None:
            return Estimate(0, 0)
        prompt = estimate_prompt(call.doc, len(call.body))
        output = 0 if call.family in NO_OUTPUT else (call.max_tokens or self.limits.default_max_tokens)
        return Estimate(prompt, prompt + output)

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
        if rec.span is not None and self.tracing is not None:
            self.tracing.inject(rec.span, headers)
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
