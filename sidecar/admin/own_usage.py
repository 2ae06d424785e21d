"""`GET /v1/usage`: a key holder's own usage summary (`since`, `by=model|day`); never another key's.

A report costs the store more than a request costs the proxy: each one takes a request from the key's
per-minute budget and a concurrency slot while it runs (429 beyond them), one report (or figure, see the
console) per key at a time, reaches back at most `store.report_max_days`, and runs, with the key's budget
figure, on the store's report connection within `store.report_timeout`.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from sidecar.admin.params import only_params, since_param, time_param
from sidecar.errors import BadRequest
from sidecar.handlers import request_id
from sidecar.keys.auth import Authenticator
from sidecar.limits.admission import Limits
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

    async def handle(self, request: web.Request) -> web.Response:
        principal = await self.auth.authenticate(request.headers, self.client_address(request))
        kid = principal.key_id
        if kid is None:
            raise BadRequest("Usage is per key; authentication is off.", code="no_key")
        only_params(request, ("since", "until", "by"))
        by = request.query.get("by", "model")
        if by not in ("model", "day"):
            raise BadRequest("`by` must be model or day.", param="by")
        since, until = since_param(request, self.max_days), time_param(request, "until")
        with self.limits.report(principal):  # the budget figure too: a key may ask for it in a loop
            rows = await self.store.usage(since, by, kid, until)
            budget = await budget_fields(kid, principal.budget_tokens, principal.budget_period, self.limits.remaining)
        doc = {"object": "list", "key_id": kid, "since": since, "until": until, "by": by, "data": rows, **budget}
        return json_response(doc, request_id(request))
