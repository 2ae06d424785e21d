"""Upstream: the one model server behind the proxy, its shared connection pool, URLs and header rules.

One connection pool per app (`sidecar.client.Pool`). Its connections idle out sooner than the upstream's own
keep-alive (uvicorn, which serves vLLM, closes idle connections after 5 s), so the proxy does not pick a
connection the upstream is closing; when the upstream closes one anyway just as a request goes out on it,
that request is sent once more on a fresh connection. Headers are filtered both ways: hop-by-hop headers,
anything the `Connection` header names, and the client's credentials never cross.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict
from prometheus_client.metrics_core import Metric

from sidecar import __version__, routes
from sidecar.config import ConfigError, UpstreamCfg
from sidecar.series import WAIT_BUCKETS, Hist, counter, gauge, histogram
from sidecar.upstream.pool import Pool, UpstreamFailure, UpstreamResponse

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by us from the peer's address (a client's own claims are kept only from a trusted proxy): vLLM's uvicorn
# believes these from 127.0.0.1, so an unchecked one would let any client choose the address vLLM logs.
_FORWARDING = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip"}
)
_TRUSTED_FORWARDING = ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-port")
# Never forwarded to the upstream: the framing we rebuild, the client's credentials, cookies and our own id.
_REQUEST_DROP = (
    _FORWARDING
    | HOP_BY_HOP
    | {
        "host",
        "content-length",
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "expect",
        "accept-encoding",
        "x-request-id",
        "content-encoding",
    }
)
# Never relayed to the client: the framing our server rebuilds, the upstream's request id (ours replaces it),
# and cookies (a model server has none to give; one that did would hand them to every key holder).
# (`Date` and `Server` are the upstream's: kept, unless `server.server_header` names us.)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id", "set-cookie"}


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def filter_headers(headers: Mapping[str, str], drop: frozenset[str]) -> dict[str, str] | CIMultiDict[str]:
    """The headers minus `drop` and whatever `Connection` names.

    A plain dict is several times cheaper to build and consume than a CIMultiDict; the multidict is
    used only when a kept header name repeats (rare: e.g. two `Link` headers), so none is lost.
    """
    named = _connection_tokens(headers) if "connection" in headers else ()
    kept = [(name, value) for name, value in headers.items() if (low := name.lower()) not in drop and low not in named]
    out = {name.lower(): value for name, value in kept}
    if len(out) == len(kept):
        return out
    return CIMultiDict(kept)


class Upstream:
    def __init__(
        self,
        cfg: UpstreamCfg,
        url: str,
        api_key: str,
        trusted_proxies: tuple[str, ...] = (),
        queue: tuple[int, float] = (256, 30.0),
    ) -> None:
        self.cfg = cfg
        self._queue_size, self._queue_timeout = queue  # a wait for a connection, when max_connections is set
        self._waited = Hist(WAIT_BUCKETS)
        self._trusted = tuple(ipaddress.ip_network(net, strict=False) for net in trusted_proxies)
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
        self.paths = frozenset(self.routes)
        self._pool: Pool | None = None
        self._closed = False

    async def open(self) -> None:
        cfg = self.cfg
        self._pool = Pool(
            self._prefix,
            cfg.pool_size,
            cfg.keepalive_timeout,
            cfg.connect_timeout,
            max_open=cfg.max_connections,
            max_waiters=self._queue_size,
            wait_timeout=self._queue_timeout,
        )
        self._pool.on_wait = self._waited.observe

    @property
    def pool(self) -> Pool:
        assert self._pool is not None, "Upstream.open() was not awaited"
        return self._pool

    async def close(self) -> None:
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

    def send(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Awaitable[UpstreamResponse]:
        """Send one request (see `Pool.send`: the keep-alive race is retried once on a fresh connection)."""
        return self.pool.send(method, target, headers.items(), body)

    def target(self, path: str, query: str) -> str:
        """The request target on the upstream: its base path (if the URL has one), our path, the query."""
        return f"{self._base}{path}?{query}" if query else self._base + path

    def request_headers(
        self, incoming: Mapping[str, str], request_id: str, peer: str | None
    ) -> dict[str, str] | CIMultiDict[str]:
        headers = filter_headers(incoming, _REQUEST_DROP)
        headers["x-request-id"] = request_id
        if peer is not None:
            claimed = incoming.get("x-forwarded-for") if self._trusted and self._is_trusted(peer) else None
            headers["x-forwarded-for"] = f"{claimed}, {peer}" if claimed else peer
            if claimed is not None:
                for name in _TRUSTED_FORWARDING:
                    if (value := incoming.get(name)) is not None:
                        headers[name] = value
        headers["accept-encoding"] = "identity"  # the proxy reads usage out of the body it relays
        if self._auth:
            headers["authorization"] = self._auth
        return headers

    def client_address(self, request: Any) -> str | None:
        """The client's address: the peer's, or the last hop a trusted proxy in front of us added to
        `X-Forwarded-For`."""
        peer: str | None = request.remote
        if peer is not None and self._trusted and self._is_trusted(peer):
            claimed = request.headers.get("x-forwarded-for")
            if claimed:
                return str(claimed).rsplit(",", 1)[-1].strip() or peer
        return peer

    def forwarded_https(self, request: Any) -> bool:
        """Whether the client reached us over TLS: here, or at a trusted proxy that says so."""
        if request.secure:
            return True
        peer = request.remote
        trusted = peer is not None and bool(self._trusted) and self._is_trusted(peer)
        return trusted and request.headers.get("x-forwarded-proto", "").strip().lower() == "https"

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    @staticmethod
    def response_headers(incoming: Mapping[str, str], request_id: str) -> dict[str, str] | CIMultiDict[str]:
        headers = filter_headers(incoming, _RESPONSE_DROP)
        headers["x-request-id"] = request_id
        return headers

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
