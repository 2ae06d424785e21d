"""create_app(settings): builds every component from its own slice of the settings and wires the routes.

Resources live in `cleanup_ctx` generators (created before `yield`, closed after, in reverse order): store,
request log, upstream session. Typed `web.AppKey`s expose components to tests and the runner. Nothing
imports this module but the CLI, the runner and tests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.admin.api import Admin
from sidecar.admin.own_usage import OwnUsage
from sidecar.audit.bus import AuditBus, Sink
from sidecar.audit.capture import Auditor
from sidecar.audit.db import DbSink
from sidecar.audit.files import JsonlSink, StderrSink
from sidecar.config import Settings, admin_token, jsonl_retention_seconds, mask_url, read_secret, retention_seconds
from sidecar.edge import server_header
from sidecar.handlers import Handlers
from sidecar.keys.auth import Authenticator
from sidecar.keys.pepper import PepperMismatch, load_pepper
from sidecar.keys.service import KeyAdmin
from sidecar.keys.static import StaticKeys
from sidecar.limits.admission import Limits
from sidecar.ops.health import Health, not_found
from sidecar.ops.logs import RequestLog
from sidecar.ops.metrics import Metrics
from sidecar.ops.peers import Peers, Worker
from sidecar.ops.rejects import RejectSampler
from sidecar.ops.state import RunState
from sidecar.ops.tracing import Tracing, require_sdk
from sidecar.ops.tracing import wanted as tracing_wanted
from sidecar.ops.upstream_page import ModelNames, UpstreamPage
from sidecar.ops.workers import spool_dir
from sidecar.proxy import Proxy
from sidecar.records.export import Exporter
from sidecar.records.record import RequestRecord
from sidecar.records.retention import Retention
from sidecar.records.writer import BatchWriter
from sidecar.store import open_store
from sidecar.store.base import Store
from sidecar.store.opener import Opener
from sidecar.upstream.server import Upstream
from sidecar.wire.headers import Forwarding

UPSTREAM = web.AppKey("upstream", Upstream)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", RunState)
PROXY = web.AppKey("proxy", Proxy)
STORE = web.AppKey("store", Store)
LIMITS = web.AppKey("limits", Limits)
AUTH = web.AppKey("auth", Authenticator)
KEYS = web.AppKey("keys", KeyAdmin)
WRITER = web.AppKey("writer", BatchWriter)
OPS = web.AppKey("ops", web.Application)  # the operations port's app, when `server.ops_port` is set
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def record_finisher(
    metrics: Metrics, writer: BatchWriter, request_log: RequestLog | None, tracing: Tracing | None, server: str
) -> Callable[[RequestRecord, bool], None]:
    """The terminal hook every record goes through exactly once: metrics and its trace span, then (when `keep`:
    see `sidecar.ops.rejects`) the store and the request log line."""

    def finish(rec: RequestRecord, keep: bool) -> None:
        metrics.observe(rec)
        if keep:
            line = writer.put(rec.as_row())
            if request_log is not None:  # the same JSON the store gets, one line per request, with its fields
                request_log.write_access(line, rec.finished_at, rec.client_addr, rec.user_agent)
        if rec.span is not None and tracing is not None:
            tracing.end(rec.span, rec, server)  # last, and it never raises: the row is what must not be lost

    return finish


async def _nothing() -> None:
    return None


def _resource(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> CleanupCtx:
    async def ctx(_: web.Application) -> AsyncIterator[None]:
        await start()
        yield
        await stop()

    return ctx


def _audit_bus(s: Settings, store: Store, spool: str) -> AuditBus:
    """The configured audit sinks. Per-key `audit = "on"` can capture even with `capture = "off"`."""
    cfg = s.audit
    sinks: list[Sink] = []
    for name in cfg.sinks:
        if name == "stderr":
            sinks.append(StderrSink(cfg.queue_size))
        elif name == "jsonl":
            directory = cfg.jsonl_dir or str(Path(s.server.data_dir) / "audit")
            keep = jsonl_retention_seconds(cfg)
            sinks.append(
                JsonlSink(cfg.queue_size, directory, cfg.jsonl_max_bytes, cfg.jsonl_max_age, cfg.jsonl_gzip, keep)
            )
        elif name == "db":
            writer = BatchWriter(store, s.writer, spool, "audit", store.insert_audit)
            sinks.append(DbSink(writer, cfg.queue_size))
    return AuditBus(sinks)


def _writer_status(writer: BatchWriter, bus: AuditBus | None) -> Callable[[], dict[str, dict[str, Any]]]:
    """Where each table's rows are going, for `/readyz`: the request log and the `db` audit sink."""
    writers = [writer, *(sink.writer for sink in (bus.sinks if bus is not None else ()) if isinstance(sink, DbSink))]
    return lambda: {w.name: w.status() for w in writers}


def server_args(settings: Settings) -> dict[str, object]:
    """Keyword arguments for aiohttp's connection handler (also used by tests' servers through the app)."""
    return {
        # Cancel the handler when the client's socket closes, so the upstream request is closed at once.
        "handler_cancellation": True,
        "keepalive_timeout": settings.server.keepalive_timeout,
        "access_log": None,
        "auto_decompress": False,
        # Deliberate head limits (aiohttp's defaults, stated): longer lines or more fields get 400 and a close.
        "max_line_size": 8190,
        "max_field_size": 8190,
        "max_headers": 100,
    }


@dataclass(frozen=True)
class Parts:
    """Every component of one app, each built from its own slice of the settings."""

    settings: Settings
    upstream: Upstream
    metrics: Metrics
    state: RunState
    store: Store
    auth: Authenticator
    limits: Limits
    forwarding: Forwarding
    keys: KeyAdmin
    request_log: RequestLog | None
    writer: BatchWriter
    bus: AuditBus | None
    rejects: RejectSampler
    retention: Retention
    proxy: Proxy
    admin: Admin
    tracing: Tracing | None
    models: ModelNames
    page: UpstreamPage  # the upstream's metrics page: `/metrics/upstream` and the engine's saturation
    exporter: Exporter  # usage rows out as CloudEvents (`export.url`; idle without one)
    peers: Peers | None  # the other workers (`server.workers` > 1): worker 0's /metrics and /drain speak for all


def build(settings: Settings, worker: Worker | None = None) -> Parts:
    """`worker`: this process's index among `server.workers` (None: the one process there is)."""
    s = settings
    traced = tracing_wanted(s.tracing, os.environ)
    if traced:
        require_sdk()  # before anything is created (a pepper file, a store): one line, and nothing left behind
    api_key = read_secret("upstream.api_key", s.upstream.api_key, s.upstream.api_key_file)
    token = admin_token(s.server)
    queue = (s.limits.queue_size, s.limits.queue_timeout)
    upstream = Upstream(s.upstream, s.upstream.url, api_key, queue)
    forwarding = Forwarding(s.server.trusted_proxies)
    metrics = Metrics(upstream.paths, upstream.routes.match)
    store = open_store(s.store.url, s.store.pool_size, s.store.op_timeout, s.store.report_timeout)
    pepper = load_pepper(s.auth.pepper, s.auth.pepper_file, s.server.data_dir, create=True)
    auth = Authenticator(s.auth, s.limits, store, pepper, StaticKeys(s.auth.static_keys_file))
    page = UpstreamPage(upstream, s.upstream.metrics_path, s.upstream.metrics_cache)
    # Workers share the store as replicas do: a key's minute limits and concurrency hold for all of them.
    limits = Limits(s.limits, store, page.read, shared=store.kind == "postgres" or s.server.workers > 1)
    request_log = RequestLog(s.server.request_log, s.server.log_flush_ms) if s.server.access_log else None
    # One journal per writer: each worker has its own.
    spool = spool_dir(s.server.data_dir, worker.index if worker is not None else None)
    writer = BatchWriter(store, s.writer, spool)
    bus = _audit_bus(s, store, spool) if s.audit.capture != "off" or s.audit.sinks else None
    auditor = Auditor(s.audit, bus.emit) if bus is not None else None
    rejects = RejectSampler(s.server.reject_rows_per_minute)
    tracing = Tracing(s.tracing, os.environ, s.audit) if traced else None
    finish = record_finisher(metrics, writer, request_log, tracing, upstream.address)
    proxy = Proxy(upstream, forwarding, s.server, limits, auth, metrics, finish, auditor, rejects, tracing)
    keys = KeyAdmin(store, pepper, s.auth.pepper_rotate)
    retention = Retention(store, retention_seconds(s.store), s.store.retention_interval)
    admin = Admin(
        token, keys, store, auth, s.store.report_max_days, limits.remaining, forwarding.client_address,
        limits.budgets.left_many,
    )  # fmt: skip
    exporter = Exporter(store, s.export, read_secret("export.token_file", s.export.token, s.export.token_file))
    return Parts(
        s, upstream, metrics, RunState(), store, auth, limits, forwarding, keys, request_log, writer, bus, rejects,
        retention, proxy, admin, tracing, ModelNames(upstream, metrics), page, exporter,
        Peers(worker, s.server.workers, s.server.host, s.server.ops_port) if worker is not None else None,
    )  # fmt: skip


def create_app(settings: Settings, worker: Worker | None = None) -> web.Application:
    parts = build(settings, worker)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        handler_args=server_args(settings),
    )
    app[UPSTREAM], app[METRICS], app[STATE], app[PROXY] = parts.upstream, parts.metrics, parts.state, parts.proxy
    app[STORE], app[LIMITS], app[AUTH], app[KEYS] = parts.store, parts.limits, parts.auth, parts.keys
    app[WRITER] = parts.writer
    app.on_response_prepare.append(server_header(settings.server.server_header))
    p = parts
    collectors = [p.writer.collect, p.upstream.collect, *p.limits.collectors(), p.rejects.collect, p.retention.collect]
    collectors += [p.tracing.collect] if p.tracing is not None else []
    collectors += [p.proxy.auditor.collect] if p.proxy.auditor is not None else []
    collectors += [p.exporter.collect] if p.settings.export.url else []
    for collect in [*collectors, p.admin.collect, *([p.bus.collect] if p.bus else [])]:
        p.metrics.add_collector(collect)
    app.cleanup_ctx.extend(_lifecycle(parts))
    ops = app
    if settings.server.ops_port:
        # Its own app (no resources of its own: the main app's cleanup contexts own them), so the client port's
        # router never holds an operations route.
        ops = app[OPS] = web.Application(handler_args=server_args(settings))
        ops.on_response_prepare.append(server_header(settings.server.server_header))
    _routes(app.router, ops.router, parts)
    if ops is not app:
        Handlers(ops.router).add("*", "/{tail:.*}", not_found)
    return app


def _lifecycle(p: Parts) -> list[CleanupCtx]:
    """The resources, opened in this order and closed in reverse: the writer and the audit sinks drain before
    the store closes; the upstream pool opens last and closes first."""

    async def check_pepper() -> None:
        try:
            await p.keys.check_pepper()
        except PepperMismatch as exc:
            p.state.refused = "pepper"  # a store that came late: the start can no longer be stopped
            raise exc from None

    opener = Opener(p.store, mask_url(p.settings.store.url), check_pepper)

    async def close_log() -> None:
        if p.request_log is not None:
            p.request_log.close()

    async def close_proxy() -> None:
        p.proxy.close()
        p.rejects.summary()

    return [
        _tracing_resource(p.tracing),  # first open, last closed: the spans of the drain's last requests go out
        _resource(opener.start, opener.close),
        _resource(p.retention.start, p.retention.close),
        _resource(p.exporter.start, p.exporter.close),
        _resource(p.writer.start, p.writer.close),
        # Allowances and slots go back before the writer's last flush: a borrow in flight could hold SQLite's
        # write lock then.
        _resource(p.limits.start, p.limits.close),
        _bus_resource(p.bus, p.settings.writer.drain_timeout),
        _resource(_nothing, close_log),
        _resource(_nothing, close_proxy),
        _resource(p.upstream.open, p.upstream.close),
        _resource(p.limits.saturation.start, p.limits.saturation.close),  # reads the upstream: after its pool
    ]


def _routes(router: web.UrlDispatcher, ops_router: web.UrlDispatcher, p: Parts) -> None:
    """Client routes on `router`; operations routes on `ops_router` (the same one when there is no ops port).
    The probes answer on both: a kubelet may probe either port."""
    health = Health(
        p.upstream, p.state, p.store, _writer_status(p.writer, p.bus), lambda: len(p.proxy.in_flight),
        p.admin.holds_token, lambda: p.limits.saturation.state, p.peers,
    )  # fmt: skip
    routes, ops = Handlers(router), Handlers(ops_router)
    for probes in {id(router): routes, id(ops_router): ops}.values():
        probes.add("GET", "/healthz", health.healthz)
        probes.add("GET", "/readyz", health.readyz)

    async def before_scrape() -> None:  # the model list for the `model` label; the budget figures per key
        await p.models.fresh()
        await p.limits.gauges.refresh()

    p.metrics.before_scrape = before_scrape
    p.metrics.pod = p.peers.metrics if p.peers is not None else None
    ops.add("GET", "/metrics", p.metrics.handle)
    ops.add("GET", "/metrics/upstream", p.page.handle)
    ops.add("GET", "/drain", health.drain)
    ops.add("POST", "/drain", health.drain)
    p.admin.add_routes(ops)
    routes.add(
        "GET",
        "/v1/usage",
        OwnUsage(p.auth, p.store, p.limits, p.settings.store.report_max_days, p.forwarding.client_address).handle,
    )
    if p.settings.console.enabled:  # never a proxied path
        # Imported here: a worker without the console (the default) does not hold its code.
        from sidecar.admin.console import Console

        days = p.settings.store.report_max_days
        console = Console(p.settings.console, p.admin, p.auth, p.store, p.limits, days, p.forwarding.forwarded_https)
        # Key holders where their requests go; operators where the admin API is (both, without an ops port).
        separate = ops_router is not router
        console.add_routes(routes, operators=not separate, holders=True)
        if separate:
            console.add_routes(ops, operators=True, holders=False)
    _proxied_routes(router, p.proxy, p.upstream.paths)


def _proxied_routes(router: web.UrlDispatcher, proxy: Proxy, paths: frozenset[str]) -> None:
    for path in sorted(paths):  # exact paths resolve in one dict lookup
        if "{" not in path:  # a template is ours to match (`Table.match`), never aiohttp's: it decodes the path
            router.add_route("*", path, proxy.handle)
    router.add_route("*", "/{tail:.*}", proxy.handle)  # everything else: our 404/405, in OpenAI's shape


def _bus_resource(bus: AuditBus | None, drain_timeout: float) -> CleanupCtx:
    async def start() -> None:
        if bus is not None:
            await bus.start()

    async def stop() -> None:
        if bus is not None:
            await bus.close(drain_timeout)

    return _resource(start, stop)


def _tracing_resource(tracing: Tracing | None) -> CleanupCtx:
    async def start() -> None:
        if tracing is not None:
            tracing.start()

    async def stop() -> None:
        if tracing is not None:
            await asyncio.to_thread(tracing.close)  # the last export blocks, bounded by its timeout

    return _resource(start, stop)
