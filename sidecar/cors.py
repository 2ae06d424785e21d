"""CORS for browser clients, answered by the sidecar for the origins in `server.cors_origins` (off by default).

With origins configured, a preflight (`OPTIONS` with `Access-Control-Request-Method`) on a route in the table is
answered here, without a key (browsers never send one on a preflight): 204 with the route's methods, the
headers asked for, a max-age, or 403 for an origin not in the list. Every answer to an allowed origin, relayed
or our own (a 401 or 429 the page must be able to read), carries `Access-Control-Allow-Origin`, `Vary: Origin`
and exposes our headers (`x-request-id`, rate limits); the upstream's own `Access-Control-*` headers are dropped.
Without origins configured the sidecar does no CORS: every preflight is refused here (403, as for an origin
not in the list), never relayed (it carries no key, and the upstream would get it with its own), and the
upstream's `Access-Control-*` headers on an answer reach the client unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from sidecar.errors import Forbidden
from sidecar.records.record import new_request_id
from sidecar.wire.routes import Route

EXPOSE = (
    "x-request-id, retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
    "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
    "x-sidecar-overhead-ms"
)
DEFAULT_REQUEST_HEADERS = "authorization, content-type, x-api-key, x-request-id"
MAX_AGE = "600"


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "access-control-request-method" in request.headers


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/") for o in origins if o != "*")

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def headers(self, request_headers: Mapping[str, str]) -> dict[str, str]:
        """What an answer to this request carries for CORS (nothing for a request from no allowed origin)."""
        origin = request_headers.get("origin")
        if not self.allows(origin):
            return {}
        assert origin is not None
        return {"access-control-allow-origin": origin, "vary": "Origin", "access-control-expose-headers": EXPOSE}

    def preflight(self, request: web.Request, route: Route) -> web.Response:
        rid = new_request_id()
        if not self.allows(request.headers.get("origin")):
            err = Forbidden("This origin may not call this server from a browser.", code="origin_not_allowed")
            headers = {"x-request-id": rid, "content-type": "application/json"}
            return web.Response(status=err.status, body=err.body(), headers=headers)
        asked = request.headers.get("access-control-request-headers", DEFAULT_REQUEST_HEADERS)
        headers = {
            **self.headers(request.headers),
            "access-control-allow-methods": route.allow,
            "access-control-allow-headers": asked[:1000],
            "access-control-max-age": MAX_AGE,
            "x-request-id": rid,
        }
        return web.Response(status=204, headers=headers)
