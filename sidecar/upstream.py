"""Upstream: the one model server behind the proxy, its shared connection pool, URLs and header rules.

One `ClientSession` per app. Its pooled connections idle out sooner than the upstream's own keep-alive
(uvicorn, which serves vLLM, closes idle connections after 5 s), so the proxy does not pick a connection the
upstream is closing; when the upstream closes one anyway just as a request goes out on it, that request is
sent once more on a fresh connection (see `Upstream.send`). Headers are filtered both ways: hop-by-hop
headers, anything the `Connection` header names, and the client's credentials never cross.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from prometheus_client.metrics_core import Metric

from sidecar.config import UpstreamCfg
from sidecar.metrics import counter

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
# Never forwarded to the upstream: the framing we rebuild, the client's credentials, cookies and our own id.
_REQUEST_DROP = HOP_BY_HOP | {
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
# Never relayed to the client: the framing aiohttp rebuilds and the upstream's request id (ours replaces it).
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id", "set-cookie", "date", "server"}

DEFAULT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def filter_headers(headers: Mapping[str, str], drop: frozenset[str]) -> dict[str, str] | CIMultiDict[str]:
    """The headers minus `drop` and whatever `Connection` names.

    A plain dict is several times cheaper for aiohttp to build and consume than a CIMultiDict; the multidict is
    used only when a kept header name repeats (rare: e.g. two `Link` headers), so none is lost.
    """
    named = _connection_tokens(headers) if "connection" in headers else ()
    kept = [(name, value) for name, value in headers.items() if (low := name.lower()) not in drop and low not in named]
    out = {name.lower(): value for name, value in kept}
    if len(out) == len(kept):
        return out
    return CIMultiDict(kept)


class HeadWatch(asyncio.Protocol):
    """Stands in front of a reused connection's protocol while a request is sent, counting what comes back.

    Installed with the public `transport.set_protocol` and taken away again as soon as the response head is
    in, so a response body never pays for it. If the send fails, `received` says whether any byte came back.
    """

    __slots__ = ("inner", "received", "transport")

    def __init__(self, inner: Any, transport: asyncio.Transport) -> None:
        self.inner = inner
        self.transport = transport
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def remove(self) -> None:
        if self.transport.get_protocol() is self:
            self.transport.set_protocol(self.inner)


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that watches the connections it hands out again (see `HeadWatch`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._served: weakref.WeakSet[object] = weakref.WeakSet()
        # Per task (a ContextVar), since one connector serves every request: read right after the send.
        self.watch: ContextVar[HeadWatch | None] = ContextVar(f"upstream-watch-{id(self)}", default=None)

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:
        conn = await super().connect(req, traces, timeout)
        protocol, transport = conn.protocol, conn.transport
        if protocol in self._served and transport is not None:
            watch = HeadWatch(protocol, transport)
            transport.set_protocol(watch)
            self.watch.set(watch)
        else:
            self._served.add(protocol)
            self.watch.set(None)
        return conn


class Upstream:
    def __init__(self, cfg: UpstreamCfg, url: str, api_key: str) -> None:
        self.cfg = cfg
        base = url.rstrip("/")
        # The URL is the OpenAI base URL (`http://vllm:8000/v1`); a bare origin works too.
        self._prefix = base[:-3] if base.endswith("/v1") else base
        parts = urlsplit(base)
        self.health_url = f"{parts.scheme}://{parts.netloc}{cfg.health_path}"
        self._auth = f"Bearer {api_key}" if api_key else None
        self.paths = frozenset(DEFAULT_PATHS) | frozenset(cfg.extra_paths)
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None
        self._connector: PoolConnector | None = None
        self.stale_retries = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.open() was not awaited"
        return self._session

    async def open(self) -> None:
        self._connector = PoolConnector(
            limit=self.cfg.pool_size, keepalive_timeout=self.cfg.keepalive_timeout, ttl_dns_cache=60
        )
        self._session = self._make_session(self._connector)
        # Retries go out on a connection of their own, never a pooled one that may be just as stale.
        self._fresh = self._make_session(aiohttp.TCPConnector(force_close=True, limit=self.cfg.pool_size))

    def _make_session(self, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.cfg.connect_timeout, sock_connect=self.cfg.connect_timeout
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()

    @property
    def closed(self) -> bool:
        return all(s is None or s.closed for s in (self._session, self._fresh))

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_upstream_stale_retries",
            "Requests sent again on a fresh connection after a pooled one closed under them.",
            (),
            {(): self.stale_retries},
        )

    async def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes) -> aiohttp.ClientResponse:
        """Send one request; if a reused pooled connection turns out closed before any answer, send it again once.

        That is the keep-alive race (RFC 9112 9.3.1): the upstream closes an idle connection just as our request
        goes out on it, and the request is refused with a FIN or RST and no byte of response. The upstream never
        handled it, so sending it again on a fresh connection is safe, and the client never sees the race.
        A failure on a fresh connection, or after any response byte, is not retried.
        """
        assert self._session is not None and self._fresh is not None and self._connector is not None
        watched = self._connector.watch
        watched.set(None)
        try:
            return await self._session.request(method, url, headers=headers, data=body, allow_redirects=False)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            watch = watched.get()
            if isinstance(exc, aiohttp.ClientConnectorError) or watch is None or watch.received:
                raise
        finally:
            if (watch := watched.get()) is not None:
                watch.remove()
        self.stale_retries += 1
        return await self._fresh.request(method, url, headers=headers, data=body, allow_redirects=False)

    def url(self, path: str, query: str) -> str:
        return f"{self._prefix}{path}?{query}" if query else self._prefix + path

    def request_headers(self, incoming: Mapping[str, str], request_id: str) -> dict[str, str] | CIMultiDict[str]:
        headers = filter_headers(incoming, _REQUEST_DROP)
        headers["x-request-id"] = request_id
        headers["accept-encoding"] = "identity"  # the proxy reads usage out of the body it relays
        if self._auth:
            headers["authorization"] = self._auth
        return headers

    @staticmethod
    def response_headers(incoming: Mapping[str, str], request_id: str) -> dict[str, str] | CIMultiDict[str]:
        headers = filter_headers(incoming, _RESPONSE_DROP)
        headers["x-request-id"] = request_id
        return headers

    async def healthy(self) -> tuple[bool, str]:
        """Whether the upstream's health endpoint answers 200 within the health timeout."""
        try:
            async with asyncio.timeout(self.cfg.health_timeout):
                async with self.session.get(self.health_url, headers=self._health_headers()) as resp:
                    await resp.read()
                    return resp.status == 200, f"upstream health answered {resp.status}"
        except TimeoutError:
            return False, "upstream health timed out"
        except aiohttp.ClientError as exc:
            return False, f"upstream unreachable: {type(exc).__name__}"

    def _health_headers(self) -> dict[str, str]:
        return {"authorization": self._auth} if self._auth else {}


def allowed_methods(path: str) -> Iterable[str]:
    return ("GET",) if path == "/v1/models" else ("POST",)
