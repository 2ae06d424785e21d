"""Prometheus metrics in a registry of the app's own, prefix `sidecar_`, every label value from a bounded set.

Routes are the allowlisted canonical paths or `other`; status codes are the ones the proxy can send or their
class (`2xx`..); reasons and outcomes are fixed enums. No key material, model names or paths from clients.

The hot path only bumps plain Python numbers (no locks, no label lookups: prometheus_client's own metric
objects cost several microseconds per update); `collect()` turns them into metric families at scrape time.
Components other than the proxy register their own small collectors through `add_collector`.
"""

from __future__ import annotations

import platform
from collections.abc import Awaitable, Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sidecar import __version__
from sidecar.errors import UPSTREAM_ERROR_REASONS, UpstreamErrorReason
from sidecar.ops.series import Hist
from sidecar.records.record import Outcome, RequestRecord, new_request_id
from sidecar.wire.routes import STREAMING, Route, family_of

_KNOWN_CODES = frozenset(
    {200, 201, 204, 400, 401, 403, 404, 405, 408, 413, 415, 422, 429, 431, 499, 500, 502, 503, 504}
)
OWN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
OTHER_MODEL = "other"  # the label of every model the upstream does not list
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The dispatch queue's refusals count by their own reason: a full queue, a place given to a higher class, a wait
# that ran out (the `x-sidecar-limit` header's value); `overloaded` is every other 503 of ours.
LIMIT_REASONS = (
    "concurrency", "rpm", "tpm", "budget", "overloaded", "queue_full", "queue_shed", "queue_timeout", "unknown_key",
)  # fmt: skip
MAX_PATHS = 1000  # request paths whose route is remembered (`Metrics._route_series`); beyond, looked up again
MAX_KEYS = 500  # key ids with a series of their own in sidecar_key_tokens_total; later ones count as `other`


def code_label(status: int) -> str:
    return str(status) if status in _KNOWN_CODES else f"{status // 100}xx"


class Metrics:
    """The proxy's series; handlers call the small methods below."""

    def __init__(self, routes: Iterable[str], match: Callable[[str], Route | None] | None = None) -> None:
        self.routes = frozenset(routes)
        self._match = match  # a path of a template route is counted under its template: labels stay bounded
        # Time to first token means something only where tokens are generated.
        self.generating = frozenset(r for r in self.routes if family_of(r) in STREAMING)
        self.registry = CollectorRegistry(auto_describe=False)
        self.in_flight = 0
        self.models: frozenset[str] = frozenset()  # what the upstream lists: the only `model` label values
        self._requests: dict[tuple[str, int, str], int] = {}
        self._duration: dict[str, Hist] = {}
        self._by_route: dict[str, _RouteSeries] = {}  # route label -> its series
        self._series: dict[str, _RouteSeries] = {}  # request path -> its route's series (`_route_series`)
        self._ttft: dict[str, Hist] = {}
        self._own: dict[str, Hist] = {}
        self._queued: dict[str, Hist] = {}
        self._upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_REASONS, 0)
        self._disconnects: dict[str, int] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._key_tokens: dict[tuple[str, str], int] = {}
        self._limited: dict[str, int] = dict.fromkeys(LIMIT_REASONS, 0)
        self._key_limited: dict[tuple[str, str], int] = {}
        self._limited_keys: set[str] = set()  # key ids with series of their own there: MAX_KEYS at most
        self.registry.register(self)
        for standard in (ProcessCollector, PlatformCollector, GCCollector):  # process_*, python_*
            standard(registry=self.registry)
        self._extra: list[Callable[[], Iterable[Metric]]] = []
        self.before_scrape: Callable[[], Awaitable[None]] | None = None  # e.g. refresh the model list
        self.pod: Callable[[bytes], Awaitable[bytes]] | None = None  # workers: the page as `ops.peers` shows it

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._extra.append(collect)

    def route(self, path: str) -> str:
        if path in self.routes:
            return path
        matched = self._match(path) if self._match is not None else None
        return matched.path if matched is not None else "other"

    def observe(self, rec: RequestRecord) -> None:
        """Everything a finished request counts for."""
        path = rec.path
        series = self._series.get(path)
        if series is None:
            series = self._route_series(path)
        key = (series.route, rec.status, rec.outcome)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        series.duration.observe(rec.latency_ms / 1000.0)
        if rec.ttft_ms is not None and series.generating:
            _hist(self._ttft, series.route, LATENCY_BUCKETS).observe(rec.ttft_ms / 1000.0)
        if rec.outcome == Outcome.CLIENT_DISCONNECTED:
            self._disconnects[series.route] = self._disconnects.get(series.route, 0) + 1
        own = rec.own_time()
        if own is not None:
            _hist(self._own, series.route, OWN_BUCKETS).observe(own[0] + own[1])
        if own is not None or rec.queued_ms:  # sent, or waited and then refused or cancelled
            _hist(self._queued, series.route, LATENCY_BUCKETS).observe(rec.queued_ms / 1000.0)
        if rec.prompt_tokens or rec.completion_tokens:
            self._count_tokens(rec)

    def _route_series(self, path: str) -> _RouteSeries:
        """A path's series, found once: a route's own path (or a template's) is remembered, up to `MAX_PATHS`
        paths; any other path is counted as `other` without being remembered (labels and memory stay bounded)."""
        route = self.route(path)
        series = self._by_route.get(route)
        if series is None:
            series = self._by_route[route] = _RouteSeries(route, route in self.generating)
            self._duration[route] = series.duration
        if route != "other" and len(self._series) < MAX_PATHS:
            self._series[path] = series
        return series

    def _count_tokens(self, rec: RequestRecord) -> None:
        model = rec.model if rec.model in self.models else OTHER_MODEL
        kid = rec.key_id or "none"
        if (kid, "prompt") not in self._key_tokens and len(self._key_tokens) >= 2 * MAX_KEYS:
            kid = OTHER_MODEL
        for kind, n in (("prompt", rec.prompt_tokens), ("completion", rec.completion_tokens)):
            if n:
                self._tokens[(kind, model)] = self._tokens.get((kind, model), 0) + n
            self._key_tokens[(kid, kind)] = self._key_tokens.get((kid, kind), 0) + (n or 0)
        # The details are parts of the two above (not added to them): what a price list sets apart.
        for kind, n in (
            ("cached", rec.cached_tokens), ("cache_write", rec.cache_write_tokens),
            ("reasoning", rec.reasoning_tokens),
        ):  # fmt: skip
            if n:
                self._tokens[(kind, model)] = self._tokens.get((kind, model), 0) + n

    def limited(self, reason: str, key_id: str | None = None) -> None:
        if reason not in self._limited:
            return
        self._limited[reason] += 1
        if key_id is None:
            return  # refused before a key was known (unknown_key, the global cap): no key's refusal
        if key_id not in self._limited_keys:
            if len(self._limited_keys) >= MAX_KEYS:
                key_id = OTHER_MODEL
            else:
                self._limited_keys.add(key_id)
        labels = (key_id, reason)
        self._key_limited[labels] = self._key_limited.get(labels, 0) + 1

    def upstream_error(self, reason: UpstreamErrorReason) -> None:
        self._upstream_errors[reason] += 1

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
        yield self._hist_family(
            "sidecar_overhead_seconds",
            "The sidecar's own time per proxied request: from arrival to the upstream request sent, less any lease "
            "wait, plus from the end of the upstream's answer to the end of ours (upstream time excluded).",
            self._own,
        )
        yield self._hist_family(
            "sidecar_lease_wait_seconds",
            "Time a proxied request waited for a lease (the key's concurrency or the global cap) before it went out.",
            self._queued,
        )
        yield GaugeMetricFamily("sidecar_in_flight_requests", "Proxied requests in progress.", value=self.in_flight)
        yield _counter("sidecar_upstream_errors", "Upstream failures by reason.", "reason", self._upstream_errors)
        yield _counter(
            "sidecar_client_disconnects", "Clients that went away before the end.", "route", self._disconnects
        )
        tokens = CounterMetricFamily(
            "sidecar_tokens",
            "Tokens recorded, by kind (prompt, completion; cached, cache_write: parts of prompt; reasoning: part "
            "of completion) and model (models the upstream does not list: other).",
            labels=("kind", "model"),
        )  # fmt: skip
        for labels, n in self._tokens.items():
            tokens.add_metric(labels, n)
        yield tokens
        key_tokens = CounterMetricFamily(
            "sidecar_key_tokens",
            f"Tokens recorded, by key id (never the key) and kind; beyond {MAX_KEYS} keys, `other`.",
            labels=("key_id", "kind"),
        )
        for labels, n in self._key_tokens.items():
            key_tokens.add_metric(labels, n)
        yield key_tokens
        yield _counter("sidecar_rate_limited", "Requests refused by a limit, by which.", "reason", self._limited)
        key_limited = CounterMetricFamily(
            "sidecar_key_limited",
            f"Requests refused by a limit, by key id (never the key) and which; beyond {MAX_KEYS} keys, `other`.",
            labels=("key_id", "reason"),
        )
        for labels, n in self._key_limited.items():
            key_limited.add_metric(labels, n)
        yield key_limited
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
        if self.before_scrape is not None:
            await self.before_scrape()
        body = generate_latest(self.registry)
        if self.pod is not None:
            body = await self.pod(body)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST, "x-request-id": new_request_id()})


class _RouteSeries:
    """What a route's requests always count in, looked up once per path instead of per request."""

    __slots__ = ("duration", "generating", "route")

    def __init__(self, route: str, generating: bool) -> None:
        self.route = route
        self.generating = generating
        self.duration = Hist(LATENCY_BUCKETS)


def _hist(hists: dict[str, Hist], route: str, buckets: tuple[float, ...]) -> Hist:
    hist = hists.get(route)
    if hist is None:
        hist = hists[route] = Hist(buckets)
    return hist


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=(label,))
    for value, n in values.items():
        family.add_metric((value,), n)
    return family
