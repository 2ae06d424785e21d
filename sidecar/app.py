"""create_app(settings): builds every component from its own slice of the settings and wires the routes.

Resources live in `cleanup_ctx` generators (created before `yield`, closed after, in reverse order). Typed
`web.AppKey`s expose components to tests and the runner. Nothing imports this module but the CLI and tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from sidecar.config import Settings, read_secret
from sidecar.health import Health, RunState
from sidecar.logs import RequestLog
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.records import RequestRecord
from sidecar.upstream import Upstream

UPSTREAM = web.AppKey("upstream", Upstream)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", RunState)
PROXY = web.AppKey("proxy", Proxy)


def record_finisher(metrics: Metrics, request_log: RequestLog | None) -> Callable[[RequestRecord], None]:
    """The terminal hook every record goes through once: metrics, then the request log line."""

    def finish(rec: RequestRecord) -> None:
        metrics.observe(metrics.route(rec.path), rec.status, rec.outcome, rec.latency_ms / 1000.0, rec.ttft_ms)
        metrics.count_tokens(rec.prompt_tokens, rec.completion_tokens)
        if request_log is not None:
            row = rec.as_row()
            row["msg"] = "request"
            request_log.write(row)

    return finish


def server_args(settings: Settings) -> dict[str, object]:
    """Keyword arguments for aiohttp's connection handler (also used by tests' servers through the app)."""
    return {
        # Cancel the handler when the client's socket closes, so the upstream request is closed at once.
        "handler_cancellation": True,
        "keepalive_timeout": settings.server.keepalive_timeout,
        "access_log": None,
        "auto_decompress": False,
    }


def create_app(settings: Settings) -> web.Application:
    s = settings
    api_key = read_secret("upstream.api_key", s.upstream.api_key, s.upstream.api_key_file)
    upstream = Upstream(s.upstream, s.upstream.url, api_key)
    metrics = Metrics(upstream.paths)
    state = RunState()
    request_log = RequestLog(s.server.request_log, s.server.log_flush_ms) if s.server.access_log else None
    proxy = Proxy(upstream, s.server, metrics, record_finisher(metrics, request_log))
    health = Health(upstream, state)

    app = web.Application(client_max_size=s.server.max_body_bytes, handler_args=server_args(s))
    app[UPSTREAM] = upstream
    app[METRICS] = metrics
    app[STATE] = state
    app[PROXY] = proxy

    async def upstream_ctx(_: web.Application) -> AsyncIterator[None]:
        await upstream.open()
        yield
        await upstream.close()

    async def request_log_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        if request_log is not None:
            request_log.close()

    app.cleanup_ctx.append(request_log_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    router = app.router
    router.add_get("/healthz", health.healthz)
    router.add_get("/readyz", health.readyz)
    router.add_get("/metrics", metrics.handle)
    router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
