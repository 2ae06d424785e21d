"""Scrape: what the sidecar reads from the upstream for its metrics.

- The upstream's own Prometheus page (vLLM's `vllm:*` series: what production-stack dashboards and KEDA read).
  The model server listens on 127.0.0.1 behind the sidecar, so nothing else can scrape it: the ops port serves
  it at `/metrics/upstream`, no key needed there (the ops port is the operator's). One fetch answers every scrape
  for `upstream.metrics_cache` seconds and concurrent scrapes share one fetch, so scrapers cannot load the
  upstream. The engine's saturation (`limits.saturation = "metrics"`) reads the same page through `read`, more
  often: a scrape then gets the page that reading fetched, never a fetch of its own.
- The upstream's model list (`/v1/models`), refreshed every minute: the only values of the `model` label of
  `sidecar_tokens_total` (a client's `model` field is free text; others count as `other`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from sidecar.errors import TRANSPORT_FAILURES
from sidecar.ops.metrics import Metrics
from sidecar.records.record import new_request_id
from sidecar.upstream.server import Upstream

log = logging.getLogger("sidecar.scrape")
PAGE_LIMIT = 16 * 1024 * 1024  # vLLM's page with many models and buckets is well under this
MODELS_EVERY = 60.0


class UpstreamPage:
    """The upstream's metrics page, cached and shared by concurrent scrapes."""

    def __init__(self, upstream: Upstream, path: str, ttl: float) -> None:
        self.upstream = upstream
        self.path = path
        self.ttl = ttl
        self._page: tuple[float, int, str, bytes] | None = None  # (fetched at, status, content type, body)
        self._fetching: asyncio.Future[tuple[float, int, str, bytes]] | None = None

    async def handle(self, request: web.Request) -> web.Response:
        try:
            _, status, content_type, body = await self._get(self.ttl)
        except TRANSPORT_FAILURES as exc:  # a text page for Prometheus, not JSON: always a 502
            text = f"# the upstream's metrics page is unavailable: {type(exc).__name__}\n"
            return web.Response(status=502, text=text, headers={"x-request-id": new_request_id()})
        headers = {"content-type": content_type or "text/plain; version=0.0.4", "x-request-id": new_request_id()}
        return web.Response(status=200 if status == 200 else 502, body=body, headers=headers)

    async def read(self, max_age: float) -> tuple[int, str, bytes]:
        """(status, content type, body) of the page, fetched at most `max_age` seconds ago (or by the fetch under
        way): TimeoutError or UpstreamFailure when it cannot be fetched."""
        _, status, content_type, body = await self._get(max_age)
        return status, content_type, body

    async def _get(self, max_age: float) -> tuple[float, int, str, bytes]:
        page = self._page
        if page is not None and time.monotonic() - page[0] < max_age:
            return page
        if self._fetching is None:
            self._fetching = fetching = asyncio.ensure_future(self._fetch())
            fetching.add_done_callback(self._fetched)  # cleared when it ends, whoever still waits for it
        return await asyncio.shield(self._fetching)  # a scraper that goes away does not cancel the others' fetch

    def _fetched(self, fetching: asyncio.Future[tuple[float, int, str, bytes]]) -> None:
        if self._fetching is fetching:
            self._fetching = None
        if not fetching.cancelled():
            fetching.exception()  # retrieved: nobody may be left to await a failed fetch

    async def _fetch(self) -> tuple[float, int, str, bytes]:
        status, content_type, body = await self.upstream.get(self.path, PAGE_LIMIT)
        page = (time.monotonic(), status, content_type, body)
        self._page = page
        return page


class ModelNames:
    """Keeps `metrics.models` to what the upstream lists. Asked for when /metrics is scraped and the list is
    older than `MODELS_EVERY` seconds (so a sidecar nobody scrapes never asks; until the first scrape, every
    model counts as `other`)."""

    def __init__(self, upstream: Upstream, metrics: Metrics) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self._asked = -MODELS_EVERY

    async def fresh(self) -> None:
        now = time.monotonic()
        if now - self._asked >= MODELS_EVERY:
            self._asked = now
            await self.refresh()

    async def refresh(self) -> None:
        """The labels follow the list; a failed ask leaves them as they were."""
        await self.upstream.models.refresh()
        if self.upstream.models.names is not None:
            self.metrics.models = self.upstream.models.names
