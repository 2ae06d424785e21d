"""The admin API: keys, the admin audit log, usage and request listings. Bearer admin token; off without one.

Every mutation goes through `KeyAdmin`, which writes the change and its audit row in one transaction. Errors
are OpenAI-shaped; the store being down is a 503, never a 500.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.metrics_core import Metric

from sidecar.auth import Authenticator, bearer_token
from sidecar.edge import read_body
from sidecar.errors import (
    BadRequest,
    NotFound,
    RateLimited,
    ReportTooSlow,
    SidecarError,
    StoreUnavailable,
    Unauthorized,
)
from sidecar.keys import KeyAdmin, listing, parse_duration
from sidecar.leases import Lease, LeaseManager
from sidecar.metrics import counter
from sidecar.records import new_request_id
from sidecar.rejects import RejectSampler
from sidecar.store.base import USAGE_GROUPS, ReportTimeout, RequestQuery, Store, StoreError

Handler = Callable[[web.Request, str], Awaitable[Any]]
MAX_PAGE = 1000
_FAILURES_LOGGED_PER_MINUTE = 10
log = logging.getLogger("sidecar.admin")


def json_response(doc: Any, request_id: str, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, headers={"content-type": "application/json", "x-request-id": request_id}
    )


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("The JSON body must be an object.", code="invalid_body")
    return doc


_INT64 = 2**63 - 1


def int_param(request: web.Request, name: str, default: int | None, low: int = 0, high: int = _INT64) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if len(raw) <= 20 else None
    except ValueError:
        value = None
    if value is None:
        raise BadRequest(f"`{name}` must be an integer.", param=name)
    if value < low or value > high:
        raise BadRequest(f"`{name}` is out of range.", param=name)
    return value


def float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"`{name}` must be epoch seconds.", param=name)
    return value


def since_param(request: web.Request, max_days: int, default_seconds: float = 86400.0) -> float:
    """`since` as epoch seconds, or a duration back from now (`24h`, `7d`), at most `max_days` back."""
    raw = request.query.get("since")
    now = time.time()
    if raw is None:
        return now - default_seconds
    try:
        value = float(raw)
    except ValueError:
        value = now - parse_duration(raw, "since")
    if not math.isfinite(value):
        raise BadRequest("`since` must be epoch seconds or a duration such as 24h.", param="since")
    if value < now - max_days * 86400:
        raise BadRequest(f"`since` may reach back at most {max_days} days (store.report_max_days).", param="since")
    return value


def store_failure(exc: StoreError, doing: str) -> SidecarError:
    """A store error as the caller sees it: a report that ran too long, or the store unavailable (503s)."""
    if isinstance(exc, ReportTimeout):
        return ReportTooSlow("The report took too long and was stopped; ask for a shorter range.")
    return StoreUnavailable(f"The store is unavailable; {doing}.")


def error_response(err: SidecarError, rid: str) -> web.Response:
    headers = {**err.headers, "x-request-id": rid, "content-type": "application/json"}
    return web.Response(status=err.status, body=err.body(), headers=headers)


def page_query(request: web.Request) -> RequestQuery:
    cursor = request.query.get("before")
    before = None
    if cursor:
        at, _, rid = cursor.partition(":")
        try:
            when = float(at)
        except ValueError:
            when = math.nan
        if not math.isfinite(when):
            raise BadRequest("`before` must be a cursor from a previous page.", param="before")
        before = (when, rid)
    return RequestQuery(
        key_id=request.query.get("key_id"),
        outcome=request.query.get("outcome"),
        since=float_param(request, "since"),
        until=float_param(request, "until"),
        limit=int_param(request, "limit", 100, 1, MAX_PAGE),
        before=before,
        request_id=request.query.get("request_id"),
    )


def page(rows: list[dict[str, Any]], limit: int, time_col: str, id_col: str = "request_id") -> dict[str, Any]:
    nxt = f"{rows[-1][time_col]}:{rows[-1][id_col]}" if len(rows) == limit else None
    return {"object": "list", "data": rows, "next_before": nxt}


class Admin:
    def __init__(self, token: str, keys: KeyAdmin, store: Store, auth: Authenticator, max_days: int = 366) -> None:
        self.max_days = max_days
        self.token = token.encode()
        self.keys = keys
        self.store = store
        self.auth = auth
        self.token_failures = 0
        # Every failure is counted; the log gets the first few a minute per address, then a summary line.
        self._failure_log = RejectSampler(_FAILURES_LOGGED_PER_MINUTE, "admin token failures not logged one by one")

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_admin_auth_failures",
            "Admin API requests refused for a missing or wrong admin token.",
            (),
            {(): self.token_failures},
        )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/keys", self._wrap(self.list_keys))
        router.add_post("/admin/keys", self._wrap(self.create_key))
        router.add_get("/admin/keys/{id}", self._wrap(self.get_key))
        router.add_patch("/admin/keys/{id}", self._wrap(self.update_key))
        router.add_delete("/admin/keys/{id}", self._wrap(self.revoke_key))
        router.add_get("/admin/audit", self._wrap(self.audit_log))
        router.add_get("/admin/usage", self._wrap(self.usage))
        router.add_get("/admin/requests", self._wrap(self.requests))
        router.add_get("/admin/audit-records", self._wrap(self.audit_records))

    def _wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            rid = new_request_id()
            try:
                self._check_token(request)
                result = await handler(request, rid)
            except SidecarError as err:
                return error_response(err, rid)
            except StoreError as exc:
                return error_response(store_failure(exc, "nothing was changed"), rid)
            if isinstance(result, web.StreamResponse):
                return result
            status = 201 if request.method == "POST" else 200
            return json_response(result, rid, status)

        return run

    def _check_token(self, request: web.Request) -> None:
        if not self.token:
            raise NotFound("The admin API is off: no admin token is configured.", code="unknown_url")
        value = request.headers.get("authorization")
        token = bearer_token(value)
        if token is None or not hmac.compare_digest(token.encode(), self.token):
            self.token_failures += 1
            if self._failure_log.keep(request.remote):
                fields = {"peer": request.remote, "method": request.method, "path": request.path[:200]}
                log.warning(
                    "admin token rejected" if value else "admin request without a token", extra={"fields": fields}
                )
            raise Unauthorized("A valid admin token is required.", code="invalid_admin_token")

    @staticmethod
    def _actor(request: web.Request) -> str:
        return f"admin-api:{request.remote or 'unknown'}"

    async def list_keys(self, request: web.Request, rid: str) -> Any:
        return {"object": "list", "data": listing(await self.store.list_keys(), self.auth.static.rows())}

    async def create_key(self, request: web.Request, rid: str) -> Any:
        created = await self.keys.create(await read_json(request), self._actor(request), rid)
        return {**created.row.public(), "key": created.key}

    async def get_key(self, request: web.Request, rid: str) -> Any:
        kid = request.match_info["id"]
        static = self.auth.static.get(kid)
        if static is not None:
            return {**static.public(), "source": "static"}
        row = await self.store.get_key(kid)
        if row is None:
            raise NotFound("No such key.", code="key_not_found")
        return {**row.public(), "source": "store"}

    def _not_static(self, kid: str) -> None:
        if self.auth.static.get(kid) is not None:
            raise BadRequest(
                "This key comes from auth.static_keys_file: change or remove its line there.", code="static_key"
            )

    async def update_key(self, request: web.Request, rid: str) -> Any:
        self._not_static(request.match_info["id"])
        row = await self.keys.update(request.match_info["id"], await read_json(request), self._actor(request), rid)
        self.auth.forget(row.id)
        return row.public()

    async def revoke_key(self, request: web.Request, rid: str) -> Any:
        self._not_static(request.match_info["id"])
        row = await self.keys.revoke(request.match_info["id"], self._actor(request), rid)
        self.auth.forget(row.id)
        return row.public()

    async def audit_log(self, request: web.Request, rid: str) -> Any:
        limit = int_param(request, "limit", 100, 1, MAX_PAGE)
        rows = await self.store.admin_events(limit, int_param(request, "before", None, 0))
        return {"object": "list", "data": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None}

    async def usage(self, request: web.Request, rid: str) -> Any:
        by = request.query.get("by", "key")
        if by not in USAGE_GROUPS:
            raise BadRequest("`by` must be key, model or day.", param="by")
        since = since_param(request, self.max_days)
        return {
            "object": "list",
            "since": since,
            "by": by,
            "data": await self.store.usage(since, by, request.query.get("key_id")),
        }

    async def requests(self, request: web.Request, rid: str) -> Any:
        query = page_query(request)
        return page(await self.store.requests(query), query.limit, "started_at")

    async def audit_records(self, request: web.Request, rid: str) -> Any:
        query = page_query(request)
        return page(await self.store.audit_records(query), query.limit, "emitted_at")


class OwnUsage:
    """`GET /v1/usage`: a key holder's own usage summary (`since`, `by=model|day`); never another key's.

    A report costs the store more than a request costs the proxy: each one takes a request from the key's
    per-minute budget and a concurrency slot while it runs (429 beyond them), reaches back at most
    `store.report_max_days`, and runs on the store's report connection within `store.report_timeout`.
    """

    def __init__(self, auth: Authenticator, store: Store, leases: LeaseManager, max_days: int) -> None:
        self.auth = auth
        self.store = store
        self.leases = leases
        self.max_days = max_days
        self._running: set[str] = set()  # keys with a report running: one at a time per key

    async def handle(self, request: web.Request) -> web.Response:
        rid = new_request_id()
        lease: Lease | None = None
        running: str | None = None
        try:
            principal = await self.auth.authenticate(request.headers)
            if principal.key_id is None:
                raise BadRequest("Usage is per key; authentication is off.", code="no_key")
            by = request.query.get("by", "model")
            if by not in ("model", "day"):
                raise BadRequest("`by` must be model or day.", param="by")
            since = since_param(request, self.max_days)
            if principal.key_id in self._running:
                raise RateLimited("One usage report at a time per key.", headers={"retry-after": "1"})
            lease = self.leases.acquire_local(principal)
            running = principal.key_id
            self._running.add(running)
            rows = await self.store.usage(since, by, principal.key_id)
        except SidecarError as err:
            return error_response(err, rid)
        except StoreError as exc:
            return error_response(store_failure(exc, "retry shortly"), rid)
        finally:
            if lease is not None:
                lease.release()
            if running is not None:
                self._running.discard(running)
        return json_response(
            {"object": "list", "key_id": principal.key_id, "since": since, "by": by, "data": rows}, rid
        )
