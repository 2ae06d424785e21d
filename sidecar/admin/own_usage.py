"""`GET /v1/usage`: a key holder's own usage summary (`since`, `by=model|day`); never another key's.

A report costs the store more than a request costs the proxy: each one takes a request from the key's
per-minute budget and a concurrency slot while it runs (429 beyond them), one report per key at a time,
reaches back at most `store.report_max_days`, and runs on the store's report connection within
`store.report_timeout`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from sidecar.admin.params import only_params, since_param, time_param
from sidecar.errors import BadRequest, RateLimited
from sidecar.handlers import request_id
from sidecar.keys.auth import Authenticator
from sidecar.limits.admission import Lease, Limits
from sidecar.limits.budgets import budget_fields
from sidecar.responses import json_response
from sidecar.store.base import Store


class OwnUsage:
    def __init__(
        self,
        auth: Authenticator,
        store: Store,
        limits: Limits,
        max_days: int,
        client_address: Callable[[web.Request], str | None] = lambda request: request.remote,
    ) -> None:
        self.client_address = client_address  # bounds a client's lookups of unknown keys (`keys.auth`)
        self.limits = limits
        self.auth = auth
        self.store = store
        self.max_days = max_days
        self._running: set[str] = set()  # keys with a report running: one at a time per key

    async def handle(self, request: web.Request) -> web.Response:
        lease: Lease | None = None
        running: str | None = None
        try:
            principal = await self.auth.authenticate(request.headers, self.client_address(request))
            if principal.key_id is None:
                raise BadRequest("Usage is per key; authentication is off.", code="no_key")
            only_params(request, ("since", "until", "by"))
            by = request.query.get("by", "model")
            if by not in ("model", "day"):
                raise BadRequest("`by` must be model or day.", param="by")
            since, until = since_param(request, self.max_days), time_param(request, "until")
            if principal.key_id in self._running:
                raise RateLimited("One usage report at a time per key.", headers={"retry-after": "1"})
            lease = self.limits.admit_local(principal)
            running = principal.key_id
            self._running.add(running)
            rows = await self.store.usage(since, by, principal.key_id, until)
        finally:
            if lease is not None:
                lease.release()
            if running is not None:
                self._running.discard(running)
        doc = {"object": "list", "key_id": principal.key_id, "since": since, "until": until, "by": by, "data": rows}
        if principal.key_id is not None:
            kid, budget, period = principal.key_id, principal.budget_tokens, principal.budget_period
            doc.update(await budget_fields(kid, budget, period, self.limits.remaining))
        return json_response(doc, request_id(request))
