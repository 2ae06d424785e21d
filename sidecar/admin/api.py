"""The admin API: keys, the admin audit log, usage and request listings. Bearer admin token; off without one.

Wrong tokens are counted per client address and port by a `Throttle` (shared with the console's sign-in): after
`FAILURES_PER_MINUTE` in a minute the next get 429, so the token cannot be guessed at the server's speed.

Every mutation goes through `KeyAdmin`, which writes the change and its audit row in one transaction. Errors
are raised and rendered by `sidecar.responses` (OpenAI-shaped; the store being down is a 503, never a 500).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import Metric

from sidecar.admin.params import MAX_PAGE, int_param, only_params, page, page_query, read_json, since_param, time_param
from sidecar.admin.tables import csv_text
from sidecar.admin.throttle import Throttle
from sidecar.errors import BadRequest, NotFound, Unauthorized
from sidecar.handlers import Handlers, request_id
from sidecar.keys.auth import Authenticator, bearer_token
from sidecar.keys.service import KeyAdmin, listing
from sidecar.limits.budgets import LeftMany, Remaining, budget_fields, listed_budgets
from sidecar.ops.rejects import RejectSampler
from sidecar.ops.series import counter
from sidecar.responses import json_response
from sidecar.store.base import USAGE_FIELDS, USAGE_GROUPS, Store

Handler = Callable[[web.Request, str], Awaitable[Any]]
_FAILURES_LOGGED_PER_MINUTE = 10
log = logging.getLogger("sidecar.admin")

ACTOR = web.RequestKey("sidecar.admin.actor", str)  # who the console's session says is making a change


class Admin:
    def __init__(
        self,
        token: str,
        keys: KeyAdmin,
        store: Store,
        auth: Authenticator,
        max_days: int = 366,
        remaining: Remaining | None = None,
        client: Callable[[web.Request], str | None] = lambda request: request.remote,
        left_many: LeftMany | None = None,
    ) -> None:
        self.remaining = remaining
        self.left_many = left_many  # the listing's budget figures: one report query for every key
        self.client = client  # the client's address (`server.trusted_proxies`): in the audit log and the throttle
        self.throttle = Throttle(client)
        self.max_days = max_days
        self.token = token.encode()
        self.keys = keys
        self.store = store
        self.auth = auth
        self.token_failures = 0
        self.on_key_change: list[Callable[[str], None]] = []  # e.g. the console drops the key's sessions
        # Every failure is counted; the log gets the first few a minute per address, then a summary line.
        self._failure_log = RejectSampler(_FAILURES_LOGGED_PER_MINUTE, "admin token failures not logged one by one")

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_admin_auth_failures",
            "Admin API requests refused for a missing or wrong admin token.",
            (),
            {(): self.token_failures},
        )

    def add_routes(self, routes: Handlers) -> None:
        routes.add("GET", "/admin/keys", self._wrap(self.list_keys))
        routes.add("POST", "/admin/keys", self._wrap(self.create_key))
        routes.add("GET", "/admin/keys/{id}", self._wrap(self.get_key))
        routes.add("PATCH", "/admin/keys/{id}", self._wrap(self.update_key))
        routes.add("DELETE", "/admin/keys/{id}", self._wrap(self.revoke_key))
        routes.add("GET", "/admin/audit", self._wrap(self.audit_log))
        routes.add("GET", "/admin/usage", self._wrap(self.usage))
        routes.add("GET", "/admin/requests", self._wrap(self.requests))
        routes.add("GET", "/admin/audit-records", self._wrap(self.audit_records))

    def _wrap(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The admin token checked, the handler's result as JSON (201 for a creation); errors are
        `sidecar.responses.rendered`'s to render."""

        async def run(request: web.Request) -> web.StreamResponse:
            rid = request_id(request)
            self._check_token(request)
            result = await handler(request, rid)
            if isinstance(result, web.StreamResponse):  # a listing in another format (CSV)
                return result
            return json_response(result, rid, 201 if request.method == "POST" else 200)

        return run

    def _check_token(self, request: web.Request) -> None:
        if not self.token:
            raise NotFound("The admin API is off: no admin token is configured.", code="unknown_url")
        value = request.headers.get("authorization")
        if value is None:  # no guess at all: counted, never throttled
            self._refused(request, "admin request without a token")
            raise Unauthorized("A valid admin token is required.", code="invalid_admin_token")
        self.throttle.check(request)
        token = bearer_token(value)
        if token is None or not self.token_matches(token):
            self.refused(request, "admin token rejected")
            raise Unauthorized("A valid admin token is required.", code="invalid_admin_token")

    def holds_token(self, request: web.Request) -> bool:
        """Whether the request carries the admin token, for a route that takes it besides another proof (`/drain`).
        None sent: False; a wrong one is refused (401, or 429 once too many) and counted as the admin API's are."""
        if not self.token or "authorization" not in request.headers:
            return False
        self._check_token(request)
        return True

    def _actor(self, request: web.Request) -> str:
        """Who made a change, for the admin audit log: an operator signed in at the OpenID provider by their
        subject and email (the console sets ACTOR), otherwise the admin token's holder by address."""
        if ACTOR in request:
            return request[ACTOR]
        via = "console" if request.path.startswith("/console/") else "admin-api"
        return f"{via}:{self.client(request) or 'unknown'}"

    async def list_keys(self, request: web.Request, rid: str) -> Any:
        only_params(request, ())  # none: a filter it would ignore is refused
        keys = listing(await self.store.list_keys(), self.auth.static.rows())
        if self.left_many is not None:
            await listed_budgets(keys, self.left_many)
        return {"object": "list", "data": keys}

    async def create_key(self, request: web.Request, rid: str) -> Any:
        only_params(request, ())  # none: a filter it would ignore is refused
        created = await self.keys.create(await read_json(request), self._actor(request), rid)
        return {**created.row.public(), "key": created.key}

    async def get_key(self, request: web.Request, rid: str) -> Any:
        only_params(request, ())  # none: a filter it would ignore is refused
        kid = request.match_info["id"]
        static = self.auth.static.get(kid)
        row = static or await self.store.get_key(kid)
        if row is None:
            raise NotFound("No such key.", code="key_not_found")
        budget = {}
        if self.remaining is not None:  # as the store keeps it (on the report connection)
            budget = await budget_fields(row.id, row.budget_tokens, row.budget_period, self.remaining)
        return {**row.public(), **budget, "source": "static" if static is not None else "store"}

    def _not_static(self, kid: str) -> None:
        if self.auth.static.get(kid) is not None:
            raise BadRequest(
                "This key comes from auth.static_keys_file: change or remove its line there.", code="static_key"
            )

    async def update_key(self, request: web.Request, rid: str) -> Any:
        only_params(request, ())  # none: a filter it would ignore is refused
        self._not_static(request.match_info["id"])
        row = await self.keys.update(request.match_info["id"], await read_json(request), self._actor(request), rid)
        self._changed(row.id)
        return row.public()

    async def revoke_key(self, request: web.Request, rid: str) -> Any:
        only_params(request, ())  # none: a filter it would ignore is refused
        self._not_static(request.match_info["id"])
        row = await self.keys.revoke(request.match_info["id"], self._actor(request), rid)
        self._changed(row.id)
        return row.public()

    def _changed(self, kid: str) -> None:
        self.auth.forget(kid)
        for listener in self.on_key_change:
            listener(kid)

    def token_matches(self, token: str) -> bool:
        # A header's bytes that are not UTF-8 arrive as lone surrogates: kept as they came, never an encode error.
        return bool(self.token) and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self.token)

    def refused(self, request: web.Request, what: str) -> None:
        """A wrong credential: counted with the admin token's failures and by the throttle, logged within the same
        per-address rate."""
        self.throttle.failed(request)
        self._refused(request, what)

    def _refused(self, request: web.Request, what: str) -> None:
        self.token_failures += 1
        client = self.client(request)
        if self._failure_log.keep(client):
            fields = {"client": client, "peer": request.remote, "method": request.method, "path": request.path[:200]}
            log.warning(what, extra={"fields": fields})

    async def audit_log(self, request: web.Request, rid: str) -> Any:
        only_params(request, ("limit", "before"))
        limit = int_param(request, "limit", 100, 1, MAX_PAGE)
        rows = await self.store.admin_events(limit, int_param(request, "before", None, 0))
        return {"object": "list", "data": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None}

    async def usage(self, request: web.Request, rid: str) -> Any:
        only_params(request, ("since", "until", "by", "key_id", "model", "format"))
        by = request.query.get("by", "key")
        if by not in USAGE_GROUPS:
            raise BadRequest("`by` must be key, model or day.", param="by")
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise BadRequest("`format` must be json or csv.", param="format")
        since, until = since_param(request, self.max_days), time_param(request, "until")
        query = request.query
        rows = await self.store.usage(since, by, query.get("key_id"), until, query.get("model"))
        if fmt == "csv":
            body = csv_text([by, *USAGE_FIELDS], rows)
            return web.Response(text=body, content_type="text/csv", headers={"x-request-id": rid})
        return {"object": "list", "since": since, "until": until, "by": by, "data": rows}

    async def requests(self, request: web.Request, rid: str) -> Any:
        only_params(request, ("key_id", "model", "outcome", "since", "until", "limit", "before", "request_id"))
        query = page_query(request)
        return page(await self.store.requests(query), query.limit, "started_at")

    async def audit_records(self, request: web.Request, rid: str) -> Any:
        only_params(request, ("key_id", "since", "until", "limit", "before", "request_id"))
        query = page_query(request)
        return page(await self.store.audit_records(query), query.limit, "emitted_at")
