"""Console: a small web console at `/console/` on the client port, off by default (`[console] enabled`).

An operator signs in with the admin token, a key holder with their key; either is exchanged for a session
cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS, path `/console`) and never kept by the page. A
session holds on the port it was made on only, and each role has its own cookie: browsers send a host's cookies
to all its ports, so an operator's session must not work on the client port, and a key holder signing in there
must not sign the operator out of the ops port. Failed sign-ins count in the admin API's `Throttle`. Every
change needs the session's CSRF token in `x-csrf-token` and a JSON body; every page and asset goes out with a
strict Content-Security-Policy (no inline script or style, nothing from elsewhere). The data comes from the
admin API's own handlers (operators) and the key's own usage (key holders: never another key's). Reports and
figures (a key's budget left) run on the store's report connection within `store.report_timeout`, as the admin
API's do, so they never queue in front of key lookups or health checks; a key holder's cost what its
`/v1/usage` does (`Limits.report`: one at a time, a request and a slot of its key's limits); a series reaches
back at most 31 days. With `[console] oidc_issuer`, operators also sign in at their OpenID provider
(`oidc.Oidc`): the same session and cookie, named in the admin audit log as `oidc:<sub> <email>`; a read-only
operator (`oidc_viewer_claim`) gets every page and is refused every change, here on the server.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from sidecar.admin.api import ACTOR, Admin
from sidecar.admin.oidc import Oidc
from sidecar.admin.params import only_params, read_json, since_param, time_param
from sidecar.admin.throttle import local_port
from sidecar.config import ConsoleCfg
from sidecar.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Overloaded,
    SidecarError,
    Unauthorized,
    UnsupportedMediaType,
)
from sidecar.handlers import Handlers, request_id
from sidecar.keys.auth import Authenticator, Principal
from sidecar.limits.admission import Limits
from sidecar.limits.budgets import budget_fields
from sidecar.responses import error_response, json_response
from sidecar.store.base import KeyRow, Store

ROLES = ("admin", "key")
COOKIES = {"admin": "sidecar_console", "key": "sidecar_console_key"}  # one per role
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
SESSIONS_PER_KEY = 5
KEY_RECHECK = 5.0  # seconds between checks that a key holder's key is still valid
TOP_GROUPS = 12
TOP_QUEUE_KEYS = 50  # keys in the queue view at most: the busiest
BUCKETS = {"hour": 3600, "day": 86400}
Handler = Callable[[web.Request, str], Awaitable[Any]]


@dataclass(slots=True)
class Session:
    role: str  # "admin" or "key"
    csrf: str
    born: float
    used: float
    port: int  # the port it was made on, and the only one it holds on
    key_id: str | None = None
    name: str | None = None
    checked: float = 0.0  # when the key was last found still valid
    principal: Principal | None = None  # a key holder's key, as last found: its limits apply to its reports
    actor: str | None = None  # an operator signed in at the OpenID provider, as the admin audit log names them
    read_only: bool = False  # a viewer: every page, no change


class Console:
    def __init__(
        self,
        cfg: ConsoleCfg,
        admin: Admin,
        auth: Authenticator,
        store: Store,
        limits: Limits,
        max_days: int,
        https: Callable[[web.Request], bool] = lambda request: request.secure,
    ) -> None:
        self.cfg = cfg
        self.admin = admin
        self.auth = auth
        self.store = store
        self.limits = limits
        self.max_days = max_days
        self.https = https  # whether the client reached us over TLS (here, or at a trusted proxy)
        self._sessions: dict[str, Session] = {}
        self.oidc = Oidc(cfg) if cfg.oidc_issuer else None
        admin.on_key_change.append(self.forget_key)

    def add_routes(self, routes: Handlers, operators: bool, holders: bool) -> None:
        """The console on one port: operators sign in where the admin API is (`operators`), key holders where
        their requests go (`holders`)."""
        routes.add("GET", "/console", self.redirect)
        routes.add("GET", "/console/", self.page)
        routes.add("GET", "/console/static/{name}", self.asset)
        roles = tuple(role for role, on in zip(ROLES, (operators, holders), strict=True) if on)
        routes.add("POST", "/console/api/session", self._secured(lambda request: self.sign_in(request, roles)))
        routes.add("GET", "/console/api/session", self._secured(lambda request: self.whoami(request, roles)))
        routes.add("DELETE", "/console/api/session", self._api(self.sign_out, "any", roles))
        if holders:
            routes.add("GET", "/console/api/me", self._api(self.me, "key", roles))
        routes.add("GET", "/console/api/series", self._api(self.series, "any", roles))
        if not operators:
            return
        if self.oidc is not None:
            routes.add("GET", "/console/oidc/login", self._secured(self.oidc_login))
            routes.add("GET", "/console/oidc/callback", self.oidc_callback)
        for method, path, handler in (
            ("GET", "/console/api/keys", self.admin.list_keys),
            ("POST", "/console/api/keys", self.admin.create_key),
            ("GET", "/console/api/keys/{id}", self.admin.get_key),
            ("PATCH", "/console/api/keys/{id}", self.admin.update_key),
            ("DELETE", "/console/api/keys/{id}", self.admin.revoke_key),
            ("GET", "/console/api/audit", self._named(self.admin.audit_log, "target", "target_name")),
            ("GET", "/console/api/usage", self._named(self.admin.usage, "key", "name")),
            ("GET", "/console/api/requests", self._named(self.admin.requests, "key_id", "key_name")),
            ("GET", "/console/api/audit-records", self._named(self.admin.audit_records, "key_id", "key_name")),
            ("GET", "/console/api/queue", self._named(self.queue, "key_id", "key_name")),
        ):
            routes.add(method, path, self._api(handler, "admin", roles))

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
        body = resources.files("sidecar.admin").joinpath("console_static", name).read_bytes()
        return web.Response(body=body, headers={**SECURITY_HEADERS, "content-type": f"{ASSETS[name]}; charset=utf-8"})

    # --- sessions ------------------------------------------------------------------------------------------

    async def sign_in(self, request: web.Request, roles: tuple[str, ...]) -> web.StreamResponse:
        rid = request_id(request)
        self._json_only(request)
        self.admin.throttle.check(request)
        doc = await read_json(request)
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise BadRequest('Send {"token": "..."}: the admin token or your key.', param="token")
        port = local_port(request)
        try:
            session = await self._session_for(token, roles, port, self.admin.throttle.client(request) or "")
        except Unauthorized:
            self.admin.refused(request, "console sign-in refused")
            raise
        resp = json_response(self._describe(session), rid)
        self._open(request, resp, session, roles)
        return resp

    def _open(self, request: web.Request, resp: web.StreamResponse, session: Session, roles: tuple[str, ...]) -> None:
        """`session` becomes this port's, its cookie on `resp`."""
        for role in roles:  # one session per port, never the old one's id: whatever was signed in here ends
            old = request.cookies.get(COOKIES[role], "")
            if old in self._sessions and self._sessions[old].port == session.port:
                del self._sessions[old]
        self._make_room(session)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = session
        for role in roles:  # the other role's cookie on this port names a session that just ended
            if role != session.role and COOKIES[role] in request.cookies:
                resp.del_cookie(COOKIES[role], path="/console")
        self._set_cookie(resp, request, sid, session)

    # --- OpenID Connect --------------------------------------------------------------------------------------

    async def oidc_login(self, request: web.Request) -> web.StreamResponse:
        """To the provider's sign-in, back at `/console/oidc/callback` on this origin (the provider accepts only
        the redirect URIs registered for the client, so a forged Host sends nobody anywhere)."""
        assert self.oidc is not None
        only_params(request, ())
        scheme = "https" if self.https(request) else "http"
        url = await self.oidc.begin(f"{scheme}://{request.host}/console/oidc/callback", local_port(request))
        return web.Response(status=302, headers={"location": url})

    async def oidc_callback(self, request: web.Request) -> web.StreamResponse:
        """The provider's answer: a session for an operator or a viewer, then the console; a refusal is a page
        saying why (its status the error's: 400 an unknown state, 401 a token refused, 403 no role)."""
        assert self.oidc is not None
        try:
            self.admin.throttle.check(request)
            if "error" in request.query:  # the person declined, or the provider refused them
                raise Unauthorized(f"The provider answered {request.query['error'][:100]}.", code="oidc_refused")
            state, code = request.query.get("state", ""), request.query.get("code", "")
            who = await self.oidc.finish(state, code, local_port(request))
        except SidecarError as err:
            if isinstance(err, Unauthorized) and err.status == 401:
                self.admin.refused(request, "console OIDC sign-in refused")
            return _refusal(err)
        now = time.monotonic()
        session = Session(
            "admin", secrets.token_urlsafe(32), now, now, local_port(request), name=who.email or who.subject,
            actor=who.actor, read_only=who.read_only,
        )  # fmt: skip
        resp = web.Response(status=303, headers={**SECURITY_HEADERS, "location": "/console/"})
        self._open(request, resp, session, ("admin",))
        return resp

    async def _session_for(self, token: str, roles: tuple[str, ...], port: int, address: str) -> Session:
        """The session a token opens on this port (`address`: the client's, which bounds its lookups of unknown
        keys). Where operators do not sign in, the admin token is not even compared: it fails as any wrong key
        does, so the client port is no oracle for it."""
        now = time.monotonic()
        if "admin" in roles and self.admin.token_matches(token):
            return Session("admin", secrets.token_urlsafe(32), now, now, port)
        if "key" not in roles:
            raise Unauthorized("Sign in with the admin token.", code="invalid_admin_token")
        principal = await self.auth.authenticate({"authorization": f"Bearer {token}"}, address)
        if principal.key_id is None:
            raise Unauthorized("Sign in with the admin token or a key.", code="invalid_api_key")
        return Session(
            "key", secrets.token_urlsafe(32), now, now, port, principal.key_id, principal.name, now, principal
        )

    def _set_cookie(self, resp: web.StreamResponse, request: web.Request, sid: str, session: Session) -> None:
        """The session's cookie, its `Max-Age` what the session has left: renewed on every answer as the session
        slides, never past `session_max_age`."""
        left = min(self.cfg.session_ttl, self.cfg.session_max_age - (time.monotonic() - session.born))
        secure = self.cfg.secure_cookie == "always" or (self.cfg.secure_cookie == "auto" and self.https(request))
        resp.set_cookie(
            COOKIES[session.role], sid, path="/console", httponly=True, samesite="Strict", secure=secure,
            max_age=max(1, math.ceil(left)),
        )  # fmt: skip

    def _make_room(self, new: Session) -> None:
        """At most SESSIONS_PER_KEY sessions per key (its oldest goes), and `max_sessions` in all: then the least
        recently used key holder's session goes (an operator's sign-in is never refused for lack of room)."""
        self._sweep()
        if new.key_id is not None:
            mine = sorted((s.used, sid) for sid, s in self._sessions.items() if s.key_id == new.key_id)
            for _, sid in mine[: max(0, len(mine) - SESSIONS_PER_KEY + 1)]:
                del self._sessions[sid]
        while len(self._sessions) >= self.cfg.max_sessions:
            holders = [(s.used, sid) for sid, s in self._sessions.items() if s.role == "key"]
            if not holders and new.role == "key":
                raise Overloaded("Too many console sessions; try again later.", headers={"retry-after": "60"})
            _, oldest = min(holders or [(s.used, sid) for sid, s in self._sessions.items()])
            del self._sessions[oldest]

    def forget_key(self, key_id: str) -> None:
        """A key was revoked or changed (on this replica): its sessions end now (elsewhere: at the next check)."""
        for sid in [sid for sid, s in self._sessions.items() if s.key_id == key_id]:
            del self._sessions[sid]

    async def whoami(self, request: web.Request, roles: tuple[str, ...]) -> web.Response:
        """The page asks who it is at load: signed out is an answer (`role: null`), not an error."""
        try:
            sid, session = await self._session(request, roles)
        except Unauthorized:
            oidc = self.oidc.host if self.oidc is not None and "admin" in roles else None
            return json_response({"role": None, "oidc": oidc}, request_id(request))
        resp = json_response(self._describe(session), request_id(request))
        self._set_cookie(resp, request, sid, session)
        return resp

    async def sign_out(self, request: web.Request, rid: str, session: Session) -> Any:
        self._sessions.pop(request.cookies.get(COOKIES[session.role], ""), None)
        resp = json_response({"signed_out": True}, rid)
        resp.del_cookie(COOKIES[session.role], path="/console")
        return resp

    @staticmethod
    def _describe(session: Session) -> dict[str, Any]:
        return {
            "role": session.role, "csrf": session.csrf, "key_id": session.key_id, "name": session.name,
            "read_only": session.read_only,
        }  # fmt: skip

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if not self._alive(s, now)]:
            del self._sessions[sid]

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.used < self.cfg.session_ttl and now - session.born < self.cfg.session_max_age

    @staticmethod
    def _secured(
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The console's security headers on every API answer, errors included (they hold keys and CSRF
        tokens: never cached)."""

        async def run(request: web.Request) -> web.StreamResponse:
            try:
                resp = await handler(request)
            except SidecarError as err:
                resp = error_response(err, request_id(request))
            resp.headers.update(SECURITY_HEADERS)
            return resp

        return run

    def _api(
        self, handler: Callable[..., Awaitable[Any]], role: str, roles: tuple[str, ...]
    ) -> Callable[[web.Request], Awaitable[Any]]:
        """A console API route on a port serving `roles`: a live session of `role` ("any": either), its CSRF token
        on every change."""

        async def run(request: web.Request) -> web.StreamResponse:
            rid = request_id(request)
            sid, session = await self._session(request, roles)
            if role not in ("any", session.role):
                raise Forbidden("Not for this session.", code="console_role")
            if session.read_only and role == "admin" and request.method != "GET":
                raise Forbidden("Read-only operators see everything and change nothing.", code="console_read_only")
            if request.method != "GET":
                self._json_only(request)
                sent = request.headers.get("x-csrf-token", "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(sent, session.csrf.encode()):
                    raise Forbidden("Missing or wrong CSRF token.", code="csrf")
            if session.actor is not None:
                request[ACTOR] = session.actor
            result = await (handler(request, rid) if role == "admin" else handler(request, rid, session))
            resp = result if isinstance(result, web.StreamResponse) else json_response(
                result, rid, 201 if request.method == "POST" else 200
            )  # fmt: skip
            if sid in self._sessions:  # not just signed out
                self._set_cookie(resp, request, sid, session)
            return resp

        return self._secured(run)

    async def _session(self, request: web.Request, roles: tuple[str, ...]) -> tuple[str, Session]:
        """The live session this request's cookies name on this port. Another port's session (the browser sends
        it here too), or another role's under a role's cookie, is no session: the same 401 as none."""
        now, port = time.monotonic(), local_port(request)
        for role in roles:
            sid = request.cookies.get(COOKIES[role], "")
            session = self._sessions.get(sid)
            if session is not None and not self._alive(session, now):
                del self._sessions[sid]
            elif session is not None and session.role == role and session.port == port:
                return sid, await self._touch(sid, session, now)
        raise Unauthorized("Sign in to the console.", code="console_session")

    async def _touch(self, sid: str, session: Session, now: float) -> Session:
        if session.key_id is not None and now - session.checked >= KEY_RECHECK:
            row = await self._still_valid(session.key_id)
            if row is None:  # revoked or expired since: the session ends
                self._sessions.pop(sid, None)
                raise Unauthorized("This key is no longer valid.", code="console_session")
            session.principal = self.auth.principal_for(row)  # its limits as they are now
            session.checked = now
        session.used = now  # sliding, within session_max_age
        return session

    async def _still_valid(self, key_id: str) -> KeyRow | None:
        row = self.auth.static.get(key_id) or await self.store.get_key(key_id)
        valid = row is not None and row.revoked_at is None and (row.expires_at or math.inf) > time.time()
        return row if valid else None

    @staticmethod
    def _json_only(request: web.Request) -> None:
        """A change comes from the page's fetch with a JSON body, never from a form another site posts."""
        if request.method in ("POST", "PATCH") and request.content_type != "application/json":
            raise UnsupportedMediaType("Send JSON (content-type: application/json).")

    # --- data ----------------------------------------------------------------------------------------------

    def _report(self, session: Session) -> contextlib.AbstractContextManager[None]:
        """A key holder's report or figure holds what its `/v1/usage` would (`Limits.report`: one at a time, a
        request of its per-minute budget, a concurrency slot); an operator's holds nothing."""
        if session.principal is None:
            return contextlib.nullcontext()
        return self.limits.report(session.principal)

    async def me(self, request: web.Request, rid: str, session: Session) -> Any:
        only_params(request, ())
        assert session.key_id is not None
        row = self.auth.static.get(session.key_id) or await self.store.get_key(session.key_id)
        if row is None:
            raise NotFound("This key is no longer in the store.", code="key_not_found")
        with self._report(session):  # its budget figure: on the report connection, under the key's limits
            budget = await budget_fields(row.id, row.budget_tokens, row.budget_period, self.limits.remaining)
        return {**row.public(), **budget}

    def _named(self, handler: Handler, id_field: str, name_field: str) -> Handler:
        """An operator's listing whose rows name a key by id (`id_field`), each row with that key's name too
        (`name_field`, null for a key no longer known): operators know keys by name, the store keeps ids."""

        async def run(request: web.Request, rid: str) -> Any:
            result = await handler(request, rid)
            if isinstance(result, dict):  # not a CSV download
                await self._add_names(result["data"], id_field, name_field)
            return result

        return run

    async def _add_names(self, rows: list[dict[str, Any]], id_field: str, name_field: str) -> None:
        """Joined here, not in the page: whatever the number of keys, every id shown gets its name. One listing of
        the store's keys per answer (a table of keys, small next to any usage) and only when a row names one."""
        ids = {row[id_field] for row in rows if row.get(id_field)}
        if not ids:
            return
        static = {row.id: row.name for row in self.auth.static.rows() if row.id in ids}
        stored = (
            {row.id: row.name for row in await self.store.list_keys() if row.id in ids} if ids - static.keys() else {}
        )
        names = {**stored, **static}  # a static key's id is found there first, as the authenticator does
        for row in rows:
            if id_field in row:
                row[name_field] = names.get(row[id_field])

    async def queue(self, request: web.Request, rid: str) -> Any:
        """Operators: the dispatch queue now (depth per class; per key what waits and runs) and each key's share of
        the tokens served over the last minutes; `top` keys at most (default and cap TOP_QUEUE_KEYS)."""
        only_params(request, ("top",))
        raw = request.query.get("top", str(TOP_QUEUE_KEYS))
        if not raw.isdigit() or not 1 <= int(raw) <= TOP_QUEUE_KEYS:
            raise BadRequest(f"`top` must be a whole number from 1 to {TOP_QUEUE_KEYS}.", param="top")
        return self.limits.local.queue_view(int(raw))

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
        with self._report(session):
            rows = await self.store.usage_series(since, until, BUCKETS[bucket], split, key_id)
        rows = _top_groups(rows, split)
        if split == "key":  # operators' only: the chart's legend names keys
            await self._add_names(rows, "key", "name")
        return {"object": "list", "since": since, "until": until, "bucket": bucket, "split": split, "data": rows}


def _top_groups(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The `TOP_GROUPS` largest groups by tokens, the rest folded into `other` (a client names its model)."""
    totals: dict[Any, int] = {}
    for row in rows:
        totals[row[split]] = totals.get(row[split], 0) + row["total_tokens"] + row["requests"]
    if len(totals) <= TOP_GROUPS:
        return rows
    keep = set(sorted(totals, key=lambda g: totals[g], reverse=True)[:TOP_GROUPS])
    folded: dict[tuple[int, Any], dict[str, Any]] = {}
    for row in rows:
        group = row[split] if row[split] in keep else "other"
        into = folded.setdefault((row["t"], group), {"t": row["t"], split: group, "requests": 0, "total_tokens": 0})
        into["requests"] += row["requests"]
        into["total_tokens"] += row["total_tokens"]
    return list(folded.values())


def _refusal(err: SidecarError) -> web.Response:
    """A refused OIDC sign-in as a page (a browser landed here): what went wrong and the way back."""
    message, code = html.escape(err.message), html.escape(err.code or "")
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign-in refused</title>'
        '<link rel="stylesheet" href="/console/static/console.css"></head><body><main><section>'
        f'<h2>Sign-in refused</h2><p id="refused" data-code="{code}">{message}</p>'
        '<p><a href="/console/">Back to the console</a></p></section></main></body></html>'
    )
    headers = {**err.headers, **SECURITY_HEADERS, "content-type": "text/html; charset=utf-8"}
    return web.Response(status=err.status, body=body.encode(), headers=headers)
