"""Upstream: the one model server behind the proxy: its URL and base path, the routes it serves (`wire.routes`,
by `upstream.kind`), its health and own pages, and `send` over its connection pool.

One connection pool per app (`pool.ConnectionPool`). Its connections idle out sooner than the upstream's own
keep-alive (uvicorn, which serves vLLM, closes idle connections after 5 s), so the proxy does not pick a
connection the upstream is closing; when the upstream closes one anyway just as a request goes out on it, that
request is sent once more on a fresh connection. Which headers cross, both ways, is `wire.headers`'s to say;
`send` adds the upstream's own credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator, MutableMapping
from urllib.parse import urlsplit

from prometheus_client.metrics_core import Metric

from sidecar import __version__
from sidecar.config import ConfigError, UpstreamCfg
from sidecar.ops.series import WAIT_BUCKETS, Hist, counter, gauge, histogram
from sidecar.upstream.models import LISTS_LENGTHS, ModelList
from sidecar.upstream.pool import ConnectionPool
from sidecar.upstream.response import UpstreamFailure, UpstreamResponse
from sidecar.wire import routes


class Upstream:
    def __init__(
        self,
        cfg: UpstreamCfg,
        url: str,
        api_key: str,
        queue: tuple[int, float] = (256, 30.0),
    ) -> None:
        self.cfg = cfg
        self._queue_size, self._queue_timeout = queue  # a wait for a connection, when max_connections is set
        self._waited = Hist(WAIT_BUCKETS)
        base = url.rstrip("/")
        # The URL is the OpenAI base URL (`http://vllm:8000/v1`); a bare origin works too.
        self._prefix = base[:-3] if base.endswith("/v1") else base
        self._auth = f"Bearer {api_key}" if api_key else None
        self._base = urlsplit(self._prefix).path.rstrip("/")
        self.address = urlsplit(self._prefix).netloc.rpartition("@")[2]  # host:port, never credentials
        self._health_target = cfg.health_path
        try:
            self.routes = routes.build(cfg.kind, cfg.routes, cfg.extra_paths)
        except routes.RouteError as exc:
            raise ConfigError(f"upstream.routes: {exc}") from None
        self.paths = frozenset(self.routes)  # exact paths and templates, as configured
        self.models = ModelList(self.get, self.target("/v1/models", ""), cfg.kind in LISTS_LENGTHS)
        self._pool: ConnectionPool | None = None
        self._closed = False

    async def open(self) -> None:
        cfg = self.cfg
        self._pool = ConnectionPool(
            self._prefix,
            cfg.pool_size,
            cfg.keepalive_timeout,
            cfg.connect_timeout,
            max_open=cfg.max_connections,
            max_waiters=self._queue_size,
            wait_timeout=self._queue_timeout,
        )
        self._pool.on_wait = self._waited.observe
        self.models.start()

    @property
    def pool(self) -> ConnectionPool:
        assert self._pool is not None, "Upstream.open() was not awaited"
        return self._pool

    async def close(self) -> None:
        await self.models.close()
        if self._pool is not None:
            await self._pool.close()
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._pool is None or self._closed

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        yield counter(
            "sidecar_upstream_stale_retries",
            "Requests sent again on a fresh connection after a pooled one closed under them.",
            (),
            {(): pool.stale_retries if pool is not None else 0},
        )
        yield gauge(
            "sidecar_upstream_connections",
            "Upstream connections: open (in use or idle) and idle.",
            ("state",),
            {("open",): pool.open_connections if pool else 0, ("idle",): pool.idle_connections if pool else 0},
        )
        yield gauge(
            "sidecar_upstream_connection_waiting",
            "Requests waiting for an upstream connection (only with upstream.max_connections).",
            (),
            {(): pool.waiting if pool else 0},
        )
        yield histogram(
            "sidecar_upstream_connection_wait_seconds",
            "How long requests waited for an upstream connection (only with upstream.max_connections).",
            self._waited,
        )

    def send(
        self, method: str, target: str, headers: MutableMapping[str, str], body: bytes
    ) -> Awaitable[UpstreamResponse]:
        """Send one request with the upstream's own credentials (see `ConnectionPool.send`: the keep-alive race is
        retried once on a fresh connection)."""
        if self._auth:
            headers["authorization"] = self._auth
        return self.pool.send(method, target, headers.items(), body)

    def target(self, path: str, query: str) -> str:
        """The request target on the upstream: its base path (if the URL has one), our path, the query."""
        return f"{self._base}{path}?{query}" if query else self._base + path

    async def healthy(self) -> tuple[bool, str]:
        """Whether the upstream's health endpoint answers 200 within the health timeout."""
        try:
            status, _, _ = await self.get(self._health_target, 1 << 20)
            return status == 200, f"upstream health answered {status}"
        except TimeoutError:
            return False, "upstream health timed out"
        except UpstreamFailure as exc:
            return False, f"upstream unreachable: {type(exc).__name__}"

    async def get(self, target: str, limit: int) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET of one of the upstream's own pages (health, metrics, models),
        within the health timeout: TimeoutError, UpstreamFailure (ResponseTooLarge past `limit` bytes)."""
        async with asyncio.timeout(self.cfg.health_timeout):
            resp = await self.pool.send("GET", target, self._health_headers().items(), b"")
            read = False
            try:
                body = await resp.read(limit)
                read = True
            finally:  # read whole: the connection may go back to the pool; cut short: it is closed
                if read:
                    resp.release()
                else:
                    resp.close()
            return resp.status, resp.headers.get("content-type", ""), body

    def _health_headers(self) -> dict[str, str]:
        """The sidecar's own requests (health, metrics page, model list) say who sends them."""
        own = {"user-agent": f"sidecar/{__version__}"}
        return {**own, "authorization": self._auth} if self._auth else own
