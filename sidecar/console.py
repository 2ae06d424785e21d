"""Console: a small web console at `/console/` on the client port, off by default (`[console] enabled`).

An operator signs in with the admin token, a key holder with their key; either is exchanged for a session
cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS, path `/console`) and never kept by the page. Every
change needs the session's CSRF token in `x-csrf-token` and a JSON body; every page and asset goes out with a
strict Content-Security-Policy (no inline script or style, nothing from elsewhere). The data comes from the
admin API's own handlers (operators) and the key's own usage (key holders: never another key's). Reports run
on the store's report connection within `store.report_timeout`, as the admin API's do, so they never queue in
front of key lookups or health checks; a series reaches back at most 31 days.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from sidecar.admin import Admin
from sidecar.auth import Authenticator
from sidecar.budgets import Budgets, budget_fields
from sidecar.config import ConsoleCfg
from sidecar.errors import BadRequest, Forbidden, NotFound, Overloaded, Unauthorized, UnsupportedMediaType
from sidecar.params import only_params, read_json, since_param, time_param
from sidecar.responses import Routes, json_response, request_id
from sidecar.store.base import Store

COOKIE = "sidecar_console"
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
    "index.html": "text/html",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
SERIES_MAX_DAYS = 31
BUCKETS = {"hour": 3600, "day": 86400}
Handler = Callable[[web.Request, str], Awaitable[Any]]


@dataclass(slots=True)
class Session:
    role: str  # "admin" or "key"
    csrf: str
    expires: float
    key_id: str | None = None
    name: str | None = None


class Console:
    def __init__(
        self, cfg: ConsoleCfg, admin: Admin, auth: Authenticator, store: Store, budgets: Budgets, max_days: int
    ) -> None:
        self.cfg = cfg
        self.admin = admin
        self.auth = auth
        self.store = store
        self.budgets = budgets
        self.max_days = max_days
        self._sessions: dict[str, Session] = {}

    def add_routes(self, routes: Routes) -> None:
        routes.add("GET", "/console", self.redirect)
        routes.add("GET", "/console/", self.page)
        routes.add("GET", "/console/static/{name}", self.asset)
        routes.add("POST", "/console/api/session", self.sign_in)
        routes.add("GET", "/console/api/session", self.whoami)
        routes.add("DELETE", "/console/api/session", self._api(self.sign_out, "any"))
        routes.add("GET", "/console/api/me", self._api(self.me, "key"))
        routes.add("GET", "/console/api/series", self._api(self.series, "any"))
        for method, path, handler in (
            ("GET", "/console/api/keys", self.admin.list_keys),
            ("POST", "/console/api/keys", self.admin.create_key),
            ("GET", "/console/api/keys/{id}", self.admin.get_key),
            ("PATCH", "/console/api/keys/{id}", self.admin.update_key),
            ("DELETE", "/console/api/keys/{id}", self.admin.revoke_key),
            ("GET", "/console/api/audit", self.admin.audit_log),
            ("GET", "/console/api/usage", self.admin.usage),
            ("GET", "/console/api/requests", self.admin.requests),
            ("GET", "/console/api/audit-records", self.admin.audit_records),
        ):
            routes.add(method, path, self._api(handler, "admin"))

    # --- pages ---------------------------------------------------------------------------------------------

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=308, headers={**SECURITY_HEADERS, "location": "/console/"})

    async def page(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS or name == "index.html":
            raise NotFound("No such file.", code="unknown_url")
        return self._asset_response(name)

    @staticmethod
    def _asset_response(name: str) -> web.Response:
        body = resources.files("sidecar").joinpath("console_static", name).read_bytes()
        return web.Response(body=body, headers={**SECURITY_HEADERS, "content-type": f"{ASSETS[name]}; charset=utf-8"})

    # --- sessions ------------------------------------------------------------------------------------------

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        rid = request_id(request)
        self._json_only(request)
        doc = await read_json(request)
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise BadRequest('Send {"token": "..."}: the admin token or your key.', param="token")
        session = await self._session_for(token)
        sid = secrets.token_urlsafe(32)
        self._sweep()
        if len(self._sessions) >= self.cfg.max_sessions:
            raise Overloaded("Too many console sessions; try again later.", headers={"retry-after": "60"})
        self._sessions[sid] = session
        resp = json_response(self._describe(session), rid)
        resp.set_cookie(
            COOKIE, sid, path="/console", httponly=True, samesite="Strict", secure=request.secure,
            max_age=int(self.cfg.session_ttl),
        )  # fmt: skip
        return resp

    async def _session_for(self, token: str) -> Session:
        expires = time.monotonic() + self.cfg.session_ttl
        admin_token = self.admin.token
        if admin_token and hmac.compare_digest(token.encode(), admin_token):
            return Session("admin", secrets.token_urlsafe(32), expires)
        principal = await self.auth.authenticate({"authorization": f"Bearer {token}"})
        if principal.key_id is None:
            raise Unauthorized("Sign in with the admin token or a key.", code="invalid_api_key")
        row = await self.store.get_key(principal.key_id)
        name = row.name if row is not None else None
        return Session("key", secrets.token_urlsafe(32), expires, principal.key_id, name)

    async def whoami(self, request: web.Request) -> web.Response:
        """The page asks who it is at load: signed out is an answer (`role: null`), not an error."""
        try:
            session = self._session(request)
        except Unauthorized:
            return json_response({"role": None}, request_id(request))
        return json_response(self._describe(session), request_id(request))

    async def sign_out(self, request: web.Request, rid: str, session: Session) -> Any:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        return {"signed_out": True}

    @staticmethod
    def _describe(session: Session) -> dict[str, Any]:
        return {"role": session.role, "csrf": session.csrf, "key_id": session.key_id, "name": session.name}

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[sid]

    def _api(self, handler: Callable[..., Awaitable[Any]], role: str) -> Callable[[web.Request], Awaitable[Any]]:
        """A console API route: a live session of `role` ("any": either), its CSRF token on every change."""

        async def run(request: web.Request) -> web.StreamResponse:
            rid = request_id(request)
            session = self._session(request)
            if role not in ("any", session.role):
                raise Forbidden("Not for this session.", code="console_role")
            if request.method != "GET":
                self._json_only(request)
                if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), session.csrf):
                    raise Forbidden("Missing or wrong CSRF token.", code="csrf")
            result = await (handler(request, rid) if role == "admin" else handler(request, rid, session))
            if isinstance(result, web.StreamResponse):
                return result
            return json_response(result, rid, 201 if request.method == "POST" else 200)

        return run

    def _session(self, request: web.Request) -> Session:
        session = self._sessions.get(request.cookies.get(COOKIE, ""))
        now = time.monotonic()
        if session is None or session.expires <= now:
            raise Unauthorized("Sign in to the console.", code="console_session")
        session.expires = now + self.cfg.session_ttl  # sliding: it lasts while it is used
        return session

    @staticmethod
    def _json_only(request: web.Request) -> None:
        """A change comes from the page's fetch with a JSON body, never from a form another site posts."""
        if request.method in ("POST", "PATCH") and request.content_type != "application/json":
            raise UnsupportedMediaType("Send JSON (content-type: application/json).")

    # --- data ----------------------------------------------------------------------------------------------

    async def me(self, request: web.Request, rid: str, session: Session) -> Any:
        only_params(request, ())
        assert session.key_id is not None
        row = await self.store.get_key(session.key_id)
        if row is None:
            raise NotFound("This key is no longer in the store.", code="key_not_found")
        budget = await budget_fields(row.id, row.budget_tokens, row.budget_period, self.budgets.remaining)
        return {**row.public(), **budget}

    async def series(self, request: web.Request, rid: str, session: Session) -> Any:
        """Requests and tokens per hour or day, split by key, model or outcome; a key holder's own only."""
        only_params(request, ("since", "until", "bucket", "split"))
        bucket = request.query.get("bucket", "day")
        split = request.query.get("split", "model")
        if bucket not in BUCKETS:
            raise BadRequest("`bucket` must be hour or day.", param="bucket")
        if split not in ("key", "model", "outcome") or (split == "key" and session.role != "admin"):
            raise BadRequest("`split` must be model or outcome (key: operators).", param="split")
        since = since_param(request, min(self.max_days, SERIES_MAX_DAYS))
        until = time_param(request, "until")
        key_id = session.key_id if session.role == "key" else None
        rows = await self.store.usage_series(since, until, BUCKETS[bucket], split, key_id)
        return {"object": "list", "since": since, "until": until, "bucket": bucket, "split": split, "data": rows}
