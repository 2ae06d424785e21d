"""Throttle: failed credentials (the admin token, a console sign-in) counted per client address and port.

A guesser gets `per_minute` failures a minute, then 429 until that minute is over, the right token included
(letting it through would make every 429 a "wrong" answer, and the guessing unlimited). The address is the
client's as the request log has it (`server.trusted_proxies`), never the proxy's: behind a proxy one guesser
must not lock out every other operator and key holder. The port is part of it, so failures on the client port
never lock an operator out of the ops port. At most `addresses` sources are kept; past that the one whose last
failure is oldest is forgotten, one at a time (never the whole table: a flood of addresses must not give a
locked-out source its tries back).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from sidecar.errors import RateLimited

FAILURES_PER_MINUTE = 10
MAX_ADDRESSES = 10_000
WINDOW = 60.0
Source = tuple[int, str]  # (the port the request came in on, the client's address)


def local_port(request: web.Request) -> int:
    """The port of ours the request came in on (0 when the socket says none): the client port or the ops port."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return int(sock[1]) if isinstance(sock, tuple) and len(sock) >= 2 else 0


class Throttle:
    def __init__(
        self,
        client: Callable[[web.Request], str | None],
        per_minute: int = FAILURES_PER_MINUTE,
        addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client  # the client's address: the peer's, or what a trusted proxy says
        self.per_minute = per_minute
        self.addresses = addresses
        self.clock = clock
        # source -> (when its window began, failures in it); least recently failed first
        self._failures: OrderedDict[Source, tuple[float, int]] = OrderedDict()

    def source(self, request: web.Request) -> Source:
        return local_port(request), self.client(request) or "unknown"

    def check(self, request: web.Request) -> None:
        """Raise 429 (with `Retry-After`) when the request's source has used up its failures this minute."""
        wait = self.retry_after(self.source(request))
        if wait > 0:
            raise RateLimited(
                "Too many failed attempts from this address; wait a minute.",
                code="too_many_failures",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )

    def failed(self, request: web.Request) -> None:
        self.count(self.source(request))

    def retry_after(self, source: Source) -> float:
        """Seconds until `source` may try again; 0 when it may now."""
        began, failures = self._failures.get(source, (0.0, 0))
        left = began + WINDOW - self.clock()
        return left if failures >= self.per_minute and left > 0 else 0.0

    def count(self, source: Source) -> None:
        now = self.clock()
        began, failures = self._failures.pop(source, (now, 0))
        if now - began >= WINDOW:
            began, failures = now, 0
        while len(self._failures) >= self.addresses:
            self._failures.popitem(last=False)
        self._failures[source] = (began, failures + 1)

    def __len__(self) -> int:
        return len(self._failures)
