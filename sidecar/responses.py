"""JSON answers of the routes that are not proxied, and the one path their errors take.

Every handler but the proxy's raises `SidecarError`s (and lets `StoreError`s through); `Routes` registers each
behind `rendered`, which renders them in OpenAI's shape with the request's id, the store's failures as 503s.
It wraps the handlers it registers rather than being an aiohttp middleware so that the proxied routes, which
render their own errors (each one also ends a record) with `error_response`, do not pay for it: a middleware
runs on every request and cost the proxied path about a tenth of its CPU.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from sidecar.errors import ReportTooSlow, SidecarError, StoreUnavailable
from sidecar.records import new_request_id
from sidecar.store.base import ReportTimeout, StoreError

REQUEST_ID = web.RequestKey("request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(doc: Any, request_id: str, status: int = 200) -> web.Response:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers)


def error_response(err: SidecarError, request_id: str, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = {**err.headers, **(extra or {}), "x-request-id": request_id, "content-type": "application/json"}
    return web.Response(status=err.status, body=err.body(), headers=headers)


def store_failure(exc: StoreError, changing: bool) -> SidecarError:
    """A store error as the caller sees it: a report that ran too long, or the store unavailable (503s)."""
    if isinstance(exc, ReportTimeout):
        return ReportTooSlow("The report took too long and was stopped; ask for a shorter range.")
    return StoreUnavailable(f"The store is unavailable; {'nothing was changed' if changing else 'retry shortly'}.")


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
            return error_response(store_failure(exc, request.method not in ("GET", "HEAD")), rid)

    return handle


class Routes:
    """Where the non-proxied routes are registered: each behind the one error path, `rendered`."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self._router = router

    def add(self, method: str, path: str, handler: Handler) -> None:
        if method == "GET":  # HEAD too, as aiohttp's add_get does
            self._router.add_get(path, rendered(handler))
        else:
            self._router.add_route(method, path, rendered(handler))
