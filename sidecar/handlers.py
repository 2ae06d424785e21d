"""Handlers of the routes that are not proxied, and the one path their errors take.

Every handler but the proxy's raises `SidecarError`s (and lets `StoreError`s through); `Handlers.add` registers
each behind `rendered`, which renders them in OpenAI's shape with the request's id, the store's failures as
503s (`sidecar.errors.failure`). It wraps the handlers it registers rather than being an aiohttp middleware so
that the proxied routes, which render their own errors (each one also ends a record) with
`responses.error_response`, do not pay for it: a middleware runs on every request and cost the proxied path
about a tenth of its CPU.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from sidecar.errors import SidecarError, failure
from sidecar.records.record import new_request_id
from sidecar.responses import error_response
from sidecar.store.base import StoreError

REQUEST_ID = web.RequestKey("request_id", str)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(request: web.Request) -> str:
    """The id of a request to a non-proxied route (given by `rendered`)."""
    return request.get(REQUEST_ID) or new_request_id()


def rendered(handler: Handler) -> Handler:
    """A non-proxied route's handler, given a request id, with what it raises rendered."""

    async def handle(request: web.Request) -> web.StreamResponse:
        rid = request[REQUEST_ID] = new_request_id()
        try:
            return await handler(request)
        except SidecarError as err:
            return error_response(err, rid)
        except StoreError as exc:
            return error_response(failure(exc, changing=request.method not in ("GET", "HEAD")).error, rid)

    return handle


class Handlers:
    """Where the non-proxied routes are registered: each behind the one error path, `rendered`."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self._router = router

    def add(self, method: str, path: str, handler: Handler) -> None:
        if method == "GET":  # HEAD too, as aiohttp's add_get does
            self._router.add_get(path, rendered(handler))
        else:
            self._router.add_route(method, path, rendered(handler))
