"""Authentication: bearer key -> Principal, with a short TTL cache so a request costs no store round trip.

A revoked key stops working within `auth.cache_ttl` on every replica sharing the store (at once on the one
that revoked it). Keys never appear in errors or logs: only their public id does.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import AuthCfg, LimitsCfg
from sidecar.errors import Forbidden, Unauthorized
from sidecar.keys import hash_secret, parse_key
from sidecar.store.base import KeyRow, Store, StoreError

MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_MAX_CACHE = 100_000


class StoreUnavailable(Unauthorized):
    status = 503
    type = "server_error"
    code = "store_unavailable"


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str | None
    name: str
    concurrency: int
    rpm: int
    tpm: int
    models: frozenset[str] | None = None
    audit: str | None = None

    def check_model(self, model: str | None) -> None:
        if self.models is not None and (model is None or model not in self.models):
            raise Forbidden(f"This key may not use model {model!r}.", param="model")


@dataclass(slots=True)
class _Entry:
    row: KeyRow | None
    principal: Principal | None
    until: float


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is not None:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return headers.get("x-api-key") or None


class Authenticator:
    def __init__(
        self,
        cfg: AuthCfg,
        limits: LimitsCfg,
        store: Store | None,
        pepper: bytes,
        static: dict[str, KeyRow] | None = None,
    ) -> None:
        self.cfg = cfg
        self.limits = limits
        self.store = store
        self.pepper = pepper
        self.static = static or {}
        self._cache: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Task[_Entry]] = {}
        self._verified: dict[str, tuple[Principal, float]] = {}  # full key -> principal, until
        self.anonymous = Principal(None, "anonymous", limits.concurrency, limits.rpm, limits.tpm)

    def forget(self, key_id: str) -> None:
        self._cache.pop(key_id, None)
        for token in [t for t, (p, _) in self._verified.items() if p.key_id == key_id]:
            del self._verified[token]

    def known(self, headers: Mapping[str, str]) -> Principal | None:
        """The principal without awaiting anything, when auth is off or the key was verified within the TTL."""
        if not self.cfg.enabled:
            return self.anonymous
        token = bearer(headers)
        seen = self._verified.get(token) if token is not None else None
        if seen is not None and seen[1] > time.monotonic():
            return seen[0]
        return None

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if not self.cfg.enabled:
            return self.anonymous
        token = bearer(headers)
        if token is None:
            raise Unauthorized(MISSING)
        # A key seen within the TTL skips parsing and hashing (the store row is cached just as long).
        seen = self._verified.get(token)
        if seen is not None and seen[1] > time.monotonic():
            return seen[0]
        parsed = parse_key(token)
        if parsed is None:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        kid, secret = parsed
        entry = await self._entry(kid)
        row = entry.row
        if row is None or not hmac.compare_digest(row.hash, hash_secret(self.pepper, secret)):
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        if row.revoked_at is not None:
            raise Unauthorized("This API key has been revoked.", code="key_revoked")
        if row.expires_at is not None and row.expires_at <= time.time():
            raise Unauthorized("This API key has expired.", code="key_expired")
        assert entry.principal is not None
        if len(self._verified) >= _MAX_CACHE:
            self._verified.clear()
        until = entry.until
        if row.expires_at is not None:  # never past the key's own expiry
            until = min(until, time.monotonic() + row.expires_at - time.time())
        self._verified[token] = (entry.principal, until)
        return entry.principal

    async def _entry(self, kid: str) -> _Entry:
        entry = self._cache.get(kid)
        if entry is not None and entry.until > time.monotonic():
            return entry
        # One store lookup per key at a time: when a busy key's cache entry expires, every request in flight
        # would otherwise query the store at once. The lookup is a task of its own, so a caller that goes
        # away does not cancel it for the others.
        loading = self._loading.get(kid)
        if loading is None:
            loading = self._loading[kid] = asyncio.get_running_loop().create_task(self._load(kid, entry))
            loading.add_done_callback(lambda task: self._loaded(kid, task))
        return await asyncio.shield(loading)

    def _loaded(self, kid: str, task: asyncio.Task[_Entry]) -> None:
        self._loading.pop(kid, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have left before it finished

    async def _load(self, kid: str, entry: _Entry | None) -> _Entry:
        now = time.monotonic()
        try:
            row = self.static.get(kid) or (await self.store.get_key(kid) if self.store is not None else None)
        except StoreError:
            if entry is not None:  # the store is down: a known key keeps working on its last known state
                return entry
            raise StoreUnavailable("The key store is unavailable; retry shortly.") from None
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        entry = self._cache[kid] = _Entry(row, self._principal(row) if row else None, now + self.cfg.cache_ttl)
        return entry

    def _principal(self, row: KeyRow) -> Principal:
        d = self.limits

        def pick(value: int | None, default: int) -> int:
            return default if value is None else value

        return Principal(
            row.id,
            row.name,
            pick(row.concurrency, d.concurrency),
            pick(row.rpm, d.rpm),
            pick(row.tpm, d.tpm),
            frozenset(row.models) if row.models is not None else None,
            row.audit,
        )
