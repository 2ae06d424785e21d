"""create_app(settings): builds every component from its own slice of the settings and wires the routes.

Resources live in `cleanup_ctx` generators (created before `yield`, closed after, in reverse order). Typed
`web.AppKey`s expose components to tests and the runner. Nothing imports this module but the CLI and tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from sidecar.config import Settings, read_secret
from sidecar.health import Health, RunState
from sidecar.logs import REQUEST_LOGGER
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.records import RequestRecord, new_request_id
from sidecar.upstream import Upstream

UPSTREAM = web.AppKey("upstream", Upstream)
METRICS = web.AppKey("metrics", Metrics)
STATE = web.AppKey("state", RunState)
PROXY = web.AppKey("proxy", Proxy)


def record_finisher(metrics: Metrics, log_requests: bool) -> Callable[[RequestRecord], None]:
    """The terminal hook every record goes through once: metrics, then the request log line."""
    logger = logging.getLogger(REQUEST_LOGGER)

    def finish(rec: RequestRecord) -> None:
        metrics.observe(metrics.route(rec.path), rec.status, rec.outcome, rec.latency_ms / 1000.0, rec.ttft_ms)
        metrics.count_tokens(rec.prompt_tokens, rec.completion_tokens)
        if log_requests:
            logger.info("request", extra={"fields": rec.as_row()})

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
    proxy = Proxy(upstream, s.server, metrics, record_finisher(metrics, s.server.access_log))
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

    app.cleanup_ctx.append(upstream_ctx)
    app.on_response_prepare.append(_ensure_request_id)
    router = app.router
    router.add_get("/healthz", health.healthz)
    router.add_get("/readyz", health.readyz)
    router.add_get("/metrics", metrics.handle)
    router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def _ensure_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # The proxy sets its own id; probes and metrics get one too, so every response carries it.
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = new_request_id()
