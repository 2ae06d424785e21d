"""JSON answers of the routes that are not proxied, and the one path their errors take (a middleware).

Every handler but the proxy's raises `SidecarError`s (and lets `StoreError`s through); `errors_middleware`
renders them in OpenAI's shape with the request's id, the store's failures as 503s. The proxy renders its own
errors (each one also ends a record) with `error_response`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

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
    """The id of a request to a non-proxied route (given by the middleware)."""
    return request.get(REQUEST_ID) or new_request_id()


def errors_middleware(passthrough: Handler) -> Middleware:
    """Gives every request but the proxied ones (`passthrough`, which keep their own ids and records) an id, and
    renders what its handler raises."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if handler == passthrough:
            return await handler(request)
        rid = request[REQUEST_ID] = new_request_id()
        try:
            return await handler(request)
        except SidecarError as err:
            return error_response(err, rid)
        except StoreError as exc:
            return error_response(store_failure(exc, request.method not in ("GET", "HEAD")), rid)

    return middleware
