"""UpstreamResponse: one answer from the upstream, its head and its body as it arrives, and the failures.

Fed by its `Connection` (`deliver`, `end`, `fail`), read by the relay (`readany`, `read`), and done with by the
relay: `release` (read to its end: the connection may go back to the pool) or `close` (anything else: the
connection is closed, which is what stops a model server generating). Reading pauses the upstream transport
while more than `HIGH_WATER` bytes wait for a slow client.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

if TYPE_CHECKING:
    from sidecar.upstream.pool import Connection

HIGH_WATER = 256 * 1024


class UpstreamFailure(Exception):
    """The upstream could not be reached or its connection failed."""


class ConnectFailed(UpstreamFailure):
    pass


class ConnectionBroken(UpstreamFailure):
    pass


class ResponseTooLarge(UpstreamFailure):
    pass


class PoolExhausted(UpstreamFailure):
    """`max_open` connections are busy and the wait for one is over its bound (queue length or time)."""


class UpstreamBroke(UpstreamFailure):
    """The upstream connection failed after its response had started."""


class UpstreamResponse:
    """One response: its head, and its body as it arrives."""

    __slots__ = (
        "_conn",
        "_data",
        "ended",
        "_error",
        "_pending",
        "_waiter",
        "content_length",
        "headers",
        "keep_alive",
        "status",
    )

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self.keep_alive = False
        self._data: deque[bytes] = deque()
        self._pending = 0
        self.ended = False  # the whole body is in `_data`
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # fed by the connection (its own use: the proxy reads, and releases or closes)

    def deliver(self, data: bytes) -> None:
        self._data.append(data)
        self._pending += len(data)
        self._wake()
        if self._pending > HIGH_WATER and self._conn is not None:
            self._conn.pause()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # read by the proxy

    async def readany(self) -> bytes:
        """What has arrived since the last call (waiting for something), or b"" at the end of the body."""
        while not self._data:
            if self.ended:
                return b""
            if self._error is not None:
                raise self._error
            assert self._conn is not None
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        data = self._data.popleft() if len(self._data) == 1 else b"".join(self._drain())
        self._pending -= len(data)
        if self._conn is not None and self._pending < HIGH_WATER // 4:
            self._conn.resume()
        return data

    @property
    def pending(self) -> int:
        """Bytes arrived and not read yet."""
        return self._pending

    def take(self) -> bytes:
        """What has arrived, without waiting: the whole body once `ended` (the usual small answer, in with its
        head)."""
        data = self._data.popleft() if len(self._data) == 1 else b"".join(self._drain())
        self._pending = 0
        if self._conn is not None:
            self._conn.resume()  # a connection paused for a slow reader goes back to the pool read again
        return data

    def _drain(self) -> Iterable[bytes]:
        while self._data:
            yield self._data.popleft()

    async def read(self, limit: int = 0) -> bytes:
        """The whole body (`ResponseTooLarge` past `limit` bytes, when set)."""
        if self.ended and not (limit and self._pending > limit):  # all in already: the usual small answer
            return self.take()
        parts = []
        size = 0
        while chunk := await self.readany():
            size += len(chunk)
            if limit and size > limit:
                raise ResponseTooLarge(f"the response body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with a response read to its end: its connection goes back to the pool when it can be reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(self.ended and self.keep_alive and not self._data)

    def close(self) -> None:
        """Done early (or on an error): close the connection, so the upstream stops working on this request."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finished(False)
