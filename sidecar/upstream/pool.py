"""The HTTP/1.1 connection pool to the one upstream: a keep-alive connection pool on asyncio protocols and httptools.

Why not aiohttp's ClientSession: per request it builds a ClientRequest, yarl URLs, header multidicts, a
ClientResponse, a StreamReader, timers and traces; measured on this machine that is ~70 µs of CPU per small
request, more than everything else the proxy does. A proxy to one origin needs none of it: it writes the
request head it already has, parses the answer with llhttp (httptools), and hands the body on as it arrives.
This client costs ~10 µs a request.

What it does, and no more:
- one origin (http or https), a pool of keep-alive connections. It opens what the requests admitted by the
  proxy's limits need (the pool is never the sidecar's concurrency limit) and keeps at most `max_idle` idle
  ones; only when an operator caps open connections (`max_open`) do requests wait for one, in order, at most
  `max_waiters` of them for at most `wait_timeout` (then `PoolExhausted`); every wait is measured (`on_wait`);
  idle connections older than `keepalive_timeout` are closed instead of reused (upstreams close theirs at 5 s);
- `send()` writes the request and returns when the response head is in; the body is read whole (`read`, with
  a size cap) or chunk by chunk (`readany`); the connection goes back to the pool only after a complete,
  keep-alive response that was read to its end (`release`), otherwise it is closed (`close`), which is what
  stops a model server generating;
- the keep-alive race (RFC 9112 9.3.1): a request on a reused connection that comes back closed before any
  byte of a response is sent once more on a new connection; `stale_retries` counts those;
- flow control: reading from the upstream pauses while more than `HIGH_WATER` bytes wait for a slow client.
Errors are `UpstreamFailure`s: `ConnectFailed` (could not connect) or `ConnectionBroken` (closed or garbled).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from sidecar.upstream.response import (
    ConnectFailed,
    ConnectionBroken,
    PoolExhausted,
    ResponseTooLarge,
    UpstreamFailure,
    UpstreamResponse,
)

__all__ = [  # the failures and the response are part of the pool's API
    "ConnectFailed",
    "ConnectionBroken",
    "ConnectionPool",
    "PoolExhausted",
    "ResponseTooLarge",
    "UpstreamFailure",
    "UpstreamResponse",
]


class Connection(asyncio.Protocol):
    """One upstream connection; it carries one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.received = 0  # bytes of the current response so far
        self.idle_since = 0.0
        self.used = 0
        self.closed = False
        self.holds_slot = True  # counted in the pool's open connections until it is done with
        self._paused = False
        self._chunked = False
        self._stray = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(ConnectionBroken(f"invalid response from the upstream: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        head_in = self.head is not None and self.head.done()
        close_delimited = exc is None and not self._chunked and response is not None and response.content_length is None
        if response is not None and head_in and not response.ended and close_delimited:
            response.end()  # a body delimited by the connection's close
            return
        reason = f"the upstream closed the connection ({exc or 'EOF'})"
        self._broken(ConnectionBroken(reason))

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        response = self.response
        if response is None or response.ended:  # bytes nobody asked for: the connection cannot be trusted
            self._stray = True
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stray or self.response is None:
            return
        key = name.decode("latin-1")
        val = value.decode("latin-1")
        self.response.headers.add(key, val)
        low = key.lower()
        if low == "content-length":
            self.response.content_length = int(val) if val.isdigit() else None
        elif low == "transfer-encoding" and "chunked" in val.lower():
            self._chunked = True

    def on_headers_complete(self) -> None:
        response = self.response
        if self._stray or response is None:
            return
        response.status = self.parser.get_status_code()
        if response.status < 200:  # 1xx (100 Continue, 103 Early Hints): the real head follows
            response.headers = CIMultiDict()
            return
        response.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if not self._stray and self.response is not None:
            self.response.deliver(body)

    def on_message_complete(self) -> None:
        response = self.response
        if not self._stray and response is not None and response.status >= 200:
            response.end()

    # used by the pool and the response

    def start(self, request: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.response = UpstreamResponse(self)
        self.head = self.loop.create_future()
        self.received = 0
        self._chunked = False
        self.used += 1
        self.transport.write(request)
        return self.head

    def _broken(self, exc: UpstreamFailure) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        elif self.response is not None and not self.response.ended:
            self.response.fail(exc)

    def finished(self, reusable: bool) -> None:
        self.response = None
        self.head = None
        if reusable and not self.closed and not self._paused:
            self.pool.put_back(self)
        else:
            self.abort()
            self.pool.done_with(self)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # no lingering: the upstream sees the connection gone at once


class ConnectionPool:
    """Keep-alive connections to one origin."""

    def __init__(
        self,
        url: str,
        max_idle: int,
        keepalive_timeout: float,
        connect_timeout: float,
        max_open: int = 0,
        max_waiters: int = 256,
        wait_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port]/..., not {url!r}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = netloc if default else f"{netloc}:{self.port}"
        self.max_idle = max_idle
        self.max_open = max_open
        self.max_waiters = max_waiters
        self.wait_timeout = wait_timeout
        self.on_wait: Callable[[float], None] | None = None  # told how long each waiting request waited
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._ssl = ssl.create_default_context() if self.tls else None
        self._idle: deque[Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closing = False
        self.stale_retries = 0

    async def send(self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> UpstreamResponse:
        """Send one request; the response's head is in when this returns."""
        request = self._encode(method, target, headers, body)
        conn = self._idle_one() or await self._acquire()
        reused = conn.used > 0
        started = False
        try:  # `_start`, inlined for the first try: one coroutine less for every request
            response = await conn.start(request)
            started = True
            return response
        except ConnectionBroken:
            if not reused or conn.received:
                raise
        finally:
            if not started:
                conn.finished(False)
        # The upstream closed a kept-alive connection under this request before answering: it never handled
        # it. Once more, on a new connection.
        self.stale_retries += 1
        return await self._start(await self._acquire(fresh=True), request)

    @staticmethod
    async def _start(conn: Connection, request: bytes) -> UpstreamResponse:
        """Write the request and wait for the head; on any failure or cancellation the connection is closed."""
        started = False
        try:
            response = await conn.start(request)
            started = True
            return response
        finally:
            if not started:
                conn.finished(False)

    def _encode(self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"host: {self.host_header}"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if body or method not in ("GET", "HEAD"):
            lines.append(f"content-length: {len(body)}")
        # aiohttp decodes a request's header bytes as UTF-8 with surrogateescape: this gives the same bytes back.
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body

    def _idle_one(self) -> Connection | None:
        """A pooled connection still fresh enough to use; the stale ones met on the way are closed."""
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be timing out
            if not conn.closed and now - conn.idle_since < self.keepalive_timeout:
                return conn
            conn.abort()
            self.done_with(conn)
        return None

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _full(self) -> bool:
        return 0 < self.max_open <= self._open

    async def _acquire(self, fresh: bool = False) -> Connection:
        if not fresh and (conn := self._idle_one()) is not None:
            return conn
        if fresh and self._full() and self._idle:
            conn = self._idle.popleft()  # make room for the new connection a retry needs
            conn.abort()
            self.done_with(conn)
        if self._full():
            started = self.loop.time()
            try:
                async with asyncio.timeout(self.wait_timeout):
                    while self._full():
                        await self._wait_for_place()
                        if self._idle and not fresh and (conn := self._idle_one()) is not None:
                            return conn
            except TimeoutError:
                raise PoolExhausted(f"no upstream connection free within {self.wait_timeout:g}s") from None
            finally:
                if self.on_wait is not None:
                    self.on_wait(self.loop.time() - started)
        self._open += 1
        new: Connection | None = None
        try:
            new = await self._connect()
            return new
        finally:
            if new is None:  # failed or cancelled: the place it held is free again
                self._open -= 1
                self._wake_one()

    async def _wait_for_place(self) -> None:
        if len(self._waiters) >= self.max_waiters:
            raise PoolExhausted(f"{self.max_waiters} requests already wait for an upstream connection")
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken and cancelled at once: the place goes to the next in line
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _connect(self) -> Connection:
        if self._closing:
            raise ConnectFailed("the upstream client is closed")
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"timed out after {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(str(exc.strerror or exc)) from None
        return conn

    def put_back(self, conn: Connection) -> None:
        conn.idle_since = self.loop.time()
        if self._closing or len(self._idle) >= self.max_idle:
            conn.abort()
            self.done_with(conn)
            return
        self._idle.append(conn)
        self._wake_one()

    def done_with(self, conn: Connection) -> None:
        """A connection that will not be reused is closed: its place is free."""
        if conn.holds_slot:
            conn.holds_slot = False
            self._open -= 1
            self._wake_one()

    def forget(self, conn: Connection) -> None:
        """A connection closed by the upstream (or by us)."""
        if conn in self._idle:
            self._idle.remove(conn)
            self.done_with(conn)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            conn = self._idle.pop()
            conn.abort()
            self.done_with(conn)
        await asyncio.sleep(0)  # let the transports finish closing
