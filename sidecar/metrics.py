"""Prometheus metrics in a registry of the app's own, prefix `sidecar_`, every label value from a bounded set.

Routes are the allowlisted canonical paths or `other`; status codes are the ones the proxy can send or their
class (`2xx`..); reasons and outcomes are fixed enums. No key material, model names or paths from clients.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar import __version__
from sidecar.records import Outcome

_KNOWN_CODES = frozenset({200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 422, 429, 431, 499, 500, 502, 503, 504})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UPSTREAM_ERROR_REASONS = ("connect", "timeout_first_byte", "timeout_idle", "status_5xx", "dropped", "protocol")


def code_label(status: int) -> str:
    return str(status) if status in _KNOWN_CODES else f"{status // 100}xx"


class Metrics:
    """All the proxy's series; the handlers call the small methods below, never prometheus_client directly."""

    def __init__(self, routes: Iterable[str]) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call] # process-wide switch of prometheus_client: `_created` series are noise
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes = frozenset(routes)
        r = self.registry
        self.requests = Counter(
            "sidecar_requests", "Requests answered by the proxy.", ("route", "code", "outcome"), registry=r
        )
        self.duration = Histogram(
            "sidecar_request_duration_seconds",
            "Time from request to last byte sent.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "sidecar_time_to_first_token_seconds",
            "Time from request to first output event.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("sidecar_in_flight_requests", "Proxied requests in progress.", registry=r)
        self.upstream_errors = Counter(
            "sidecar_upstream_errors", "Upstream failures by reason.", ("reason",), registry=r
        )
        self.disconnects = Counter(
            "sidecar_client_disconnects", "Clients that went away before the end.", ("route",), registry=r
        )
        self.tokens = Counter("sidecar_tokens", "Tokens recorded, by kind.", ("kind",), registry=r)
        info = Gauge("sidecar_build_info", "Build information.", ("version", "python"), registry=r)
        info.labels(__version__, platform.python_version()).set(1)
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(reason)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)
        self._children: dict[tuple[str, int, str], Counter] = {}

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe(self, route: str, status: int, outcome: str, seconds: float, ttft_ms: float | None) -> None:
        key = (route, status, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, code_label(status), outcome)
        child.inc()
        self.duration.labels(route).observe(seconds)
        if ttft_ms is not None:
            self.ttft.labels(route).observe(ttft_ms / 1000.0)
        if outcome == Outcome.CLIENT_DISCONNECTED:
            self.disconnects.labels(route).inc()

    def upstream_error(self, reason: str) -> None:
        self.upstream_errors.labels(reason).inc()

    def count_tokens(self, prompt: int | None, completion: int | None) -> None:
        if prompt:
            self.tokens.labels("prompt").inc(prompt)
        if completion:
            self.tokens.labels("completion").inc(completion)

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})
