"""Prometheus metrics in a registry of the app's own, prefix `sidecar_`, every label value from a bounded set.

Routes are the allowlisted canonical paths or `other`; status codes are the ones the proxy can send or their
class (`2xx`..); reasons and outcomes are fixed enums. No key material, model names or paths from clients.

The hot path only bumps plain Python numbers (no locks, no label lookups: prometheus_client's own metric
objects cost several microseconds per update); `collect()` turns them into metric families at scrape time.
Components other than the proxy register their own small collectors through `add_collector`.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, get_args

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sidecar import __version__
from sidecar.records import Outcome, new_request_id
from sidecar.series import Hist

_KNOWN_CODES = frozenset(
    {200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 431, 499, 500, 502, 503, 504}
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UpstreamErrorReason = Literal[
    "connect", "timeout_first_byte", "timeout_idle", "timeout_total", "status_5xx", "dropped", "protocol"
]
UPSTREAM_ERROR_REASONS: tuple[UpstreamErrorReason, ...] = get_args(UpstreamErrorReason)


def code_label(status: int) -> str:
    return str(status) if status in _KNOWN_CODES else f"{status // 100}xx"


class Metrics:
    """The proxy's series; handlers call the small methods below."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.routes = frozenset(routes)
        self.registry = CollectorRegistry(auto_describe=False)
        self.in_flight = 0
        self._requests: dict[tuple[str, int, str], int] = {}
        self._duration: dict[str, Hist] = {}
        self._ttft: dict[str, Hist] = {}
        self._upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_REASONS, 0)
        self._disconnects: dict[str, int] = {}
        self._tokens = {"prompt": 0, "completion": 0}
        self.registry.register(self)
        self._extra: list[Callable[[], Iterable[Metric]]] = []

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._extra.append(collect)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe(self, route: str, status: int, outcome: Outcome, seconds: float, ttft_ms: float | None) -> None:
        key = (route, status, outcome)
        self._requests[key] = self._requests.get(key, 0) + 1
        hist = self._duration.get(route)
        if hist is None:
            hist = self._duration[route] = Hist(LATENCY_BUCKETS)
        hist.observe(seconds)
        if ttft_ms is not None:
            hist = self._ttft.get(route)
            if hist is None:
                hist = self._ttft[route] = Hist(LATENCY_BUCKETS)
            hist.observe(ttft_ms / 1000.0)
        if outcome == Outcome.CLIENT_DISCONNECTED:
            self._disconnects[route] = self._disconnects.get(route, 0) + 1

    def upstream_error(self, reason: UpstreamErrorReason) -> None:
        self._upstream_errors[reason] += 1

    def count_tokens(self, prompt: int | None, completion: int | None) -> None:
        if prompt:
            self._tokens["prompt"] += prompt
        if completion:
            self._tokens["completion"] += completion

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sidecar_requests", "Requests answered by the proxy.", labels=("route", "code", "outcome")
        )
        merged: dict[tuple[str, str, str], int] = {}
        for (route, status, outcome), n in self._requests.items():
            key = (route, code_label(status), outcome)
            merged[key] = merged.get(key, 0) + n
        for key, n in merged.items():
            requests.add_metric(key, n)
        yield requests
        yield self._hist_family(
            "sidecar_request_duration_seconds", "Time from request to last byte sent.", self._duration
        )
        yield self._hist_family(
            "sidecar_time_to_first_token_seconds",
            "Time from request to the first output (whole body for non-streaming).",
            self._ttft,
        )
        yield GaugeMetricFamily("sidecar_in_flight_requests", "Proxied requests in progress.", value=self.in_flight)
        yield _counter("sidecar_upstream_errors", "Upstream failures by reason.", "reason", self._upstream_errors)
        yield _counter(
            "sidecar_client_disconnects", "Clients that went away before the end.", "route", self._disconnects
        )
        yield _counter("sidecar_tokens", "Tokens recorded, by kind.", "kind", self._tokens)
        info = GaugeMetricFamily("sidecar_build_info", "Build information.", labels=("version", "python"))
        info.add_metric((__version__, platform.python_version()), 1)
        yield info
        for extra in self._extra:
            yield from extra()

    @staticmethod
    def _hist_family(name: str, doc: str, hists: dict[str, Hist]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=("route",))
        for route, hist in hists.items():
            family.add_metric((route,), hist.buckets(), hist.total)
        return family

    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST, "x-request-id": new_request_id()})


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=(label,))
    for value, n in values.items():
        family.add_metric((value,), n)
    return family
