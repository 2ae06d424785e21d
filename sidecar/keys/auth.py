"""Authentication: bearer key -> Principal, with a short TTL cache so a request costs no store round trip.

A revoked key stops working within `auth.cache_ttl` on every replica sharing the store (at once on the one
that revoked it: revocation wins over a lookup still in flight, which looks again instead of caching what it
read before). A key in use is looked up again in the background once half its TTL has passed, so a busy key
never waits on the store. While the store is unreachable, keys it confirmed within `auth.max_stale` keep
working on their last known state without waiting for it: a request waits for the store at most
`auth.lookup_timeout`, and only when the store was answering a moment ago or the key is not known; after
`max_stale`, and for keys never seen, requests fail closed with a 503. Static keys come from
`auth.static_keys_file`, reloaded when it changes. Keys never appear in errors or logs: only their public id.

Forged keys (well formed, any id) cost a store lookup each, so they are bounded twice. The ids the store said
do not exist are cached apart from the keys it confirmed, each table a bounded LRU (the oldest entry goes, never
the whole table): forged ids only push out other forged ids, never a real key's last known state (which is
what serves it through a store outage). And a lookup of an id this replica holds nothing for costs the client's
address (`Forwarding.client_address`) one of `auth.unknown_key_rate` a minute, all addresses together at most
`UNKNOWN_GLOBAL_FACTOR` times that (`LookupGate`); past it the request gets 429 with `Retry-After`, without a
lookup. A 429 rather than a 401: the gate is decided before the store is asked, so it would also refuse a real
key new to this replica that shares an address with a forger (a NAT, a proxy not in `server.trusted_proxies`);
a 401 would tell that client its key is wrong and most clients stop there, a 429 tells it to retry, which
clients do (OpenAI's SDKs honour `Retry-After`). The forger learns nothing from it: whether an id is asked for
depends only on whether this replica holds it, never on whether a key is valid (key ids are public anyway).
A lookup that finds a real key gives its allowance back, so only forged keys use it up.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import AuthCfg, LimitsCfg
from sidecar.errors import Forbidden, KeyNotValid, RateLimited, StoreUnavailable, Unauthorized
from sidecar.keys.format import hash_secret, parse_key
from sidecar.keys.static import StaticKeys
from sidecar.store.base import KeyRow, Store, StoreError

MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_MAX_CACHE = 100_000  # keys the store confirmed (and tokens verified): far more than a deployment has in use
_MAX_UNKNOWN = 10_000  # ids the store said do not exist
_MAX_SOURCES = 10_000  # client addresses the lookup gate tracks
UNKNOWN_GLOBAL_FACTOR = 10  # all addresses together: this many times one address's allowance
log = logging.getLogger("sidecar.auth")


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str | None
    name: str
    concurrency: int
    rpm: int
    tpm: int
    models: frozenset[str] | None = None
    audit: str | None = None
    budget_tokens: int | None = None
    budget_period: str | None = None
    weight: float = 1.0  # its share of the upstream under contention
    priority: str = "normal"  # its class in the dispatch queue
    cache_group: str | None = None  # the prefix-cache group it shares a salt with; None: a salt of its own

    def check_model(self, model: str | None) -> None:
        if self.models is not None and (model is None or model not in self.models):
            raise Forbidden(f"This key may not use model {model!r}.", param="model")


@dataclass(slots=True)
class _Entry:
    row: KeyRow | None
    principal: Principal | None
    until: float
    fetched: float  # when the store (or the static file) last answered for this key: the start of staleness
    static: bool = False  # the key came from the static file: if it leaves the file, it is gone (no store lookup)
    refresh_at: float = 0.0  # from then on, a request starts a lookup in the background and is served this entry


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for any other scheme or an empty token."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer(headers: Mapping[str, str]) -> str | None:
    """A client's key: the bearer token, or (without an `Authorization` header) `x-api-key`, as Anthropic's SDKs
    send it; None when both name a key and they differ (`conflicting`)."""
    value = headers.get("authorization")
    if value is not None:
        token = bearer_token(value)
        return None if conflicting(token, headers) else token
    return headers.get("x-api-key") or None


def conflicting(token: str | None, headers: Mapping[str, str]) -> bool:
    """A bearer token and an `x-api-key` that differ: which one was meant cannot be told, so neither is used."""
    other = headers.get("x-api-key")
    return token is not None and bool(other) and other != token


CONFLICT = "Two different API keys were sent (Authorization: Bearer and x-api-key); send one."


class LookupGate:
    """Lookups of key ids a client address may start: `per_minute` a minute each (a token bucket holding a
    minute's worth), all addresses together `UNKNOWN_GLOBAL_FACTOR` times that; 0 turns it off. The addresses
    are an LRU of `_MAX_SOURCES`: one that falls out starts again with a full bucket, which the shared bucket
    still bounds."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._sources: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, stamp)
        self._all = (self.capacity * UNKNOWN_GLOBAL_FACTOR, time.monotonic())

    def take(self, source: str | None) -> float:
        """0.0 when a lookup for `source` may start (and is counted), else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        address = source or "unknown"
        mine, shared = self._tokens(address, now)
        allowed = mine >= 1.0 and shared >= 1.0
        if allowed:
            mine, shared = mine - 1.0, shared - 1.0
        self._keep(address, mine, shared, now)
        return 0.0 if allowed else max((1.0 - mine) / self.rate, (1.0 - shared) / (self.rate * UNKNOWN_GLOBAL_FACTOR))

    def refund(self, source: str | None) -> None:
        """A lookup that found a real key: its allowance back (only forged keys use it up)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        address = source or "unknown"
        mine, shared = self._tokens(address, now)
        self._keep(
            address, min(self.capacity, mine + 1.0), min(self.capacity * UNKNOWN_GLOBAL_FACTOR, shared + 1.0), now
        )

    def _tokens(self, address: str, now: float) -> tuple[float, float]:
        """The address's tokens and everyone's, refilled up to now."""
        tokens, stamp = self._sources.get(address, (self.capacity, now))
        mine = min(self.capacity, tokens + (now - stamp) * self.rate)
        tokens, stamp = self._all
        everyone = self.capacity * UNKNOWN_GLOBAL_FACTOR
        return mine, min(everyone, tokens + (now - stamp) * self.rate * UNKNOWN_GLOBAL_FACTOR)

    def _keep(self, address: str, mine: float, shared: float, now: float) -> None:
        self._all = (shared, now)
        self._sources[address] = (mine, now)
        self._sources.move_to_end(address)
        if len(self._sources) > _MAX_SOURCES:
            self._sources.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        cfg: AuthCfg,
        limits: LimitsCfg,
        store: Store | None,
        pepper: bytes,
        static: StaticKeys | None = None,
    ) -> None:
        self.cfg = cfg
        self.limits = limits
        self.store = store
        self.pepper = pepper
        self.static = static or StaticKeys("")
        self._cache: OrderedDict[str, _Entry] = OrderedDict()  # ids the store (or the file) has a key for: LRU
        self._unknown: OrderedDict[str, _Entry] = OrderedDict()  # ids it had none for: an LRU of their own
        self.gate = LookupGate(cfg.unknown_key_rate)
        self._generation: dict[str, int] = {}  # bumped by `forget`: a lookup that saw another one does not count
        self._serving_stale = False  # the last lookup failed: keys known within max_stale are served at once
        self.stale_served = 0  # requests served a key's last known state because the store did not answer
        self._loading: dict[str, asyncio.Task[_Entry]] = {}
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()  # full key -> principal, until
        self.anonymous = Principal(None, "anonymous", limits.concurrency, limits.rpm, limits.tpm)

    def forget(self, key_id: str) -> None:
        """The key changed (revoked, updated): drop what is cached, and what a lookup in flight would cache."""
        self._generation[key_id] = self._generation.get(key_id, 0) + 1
        self._cache.pop(key_id, None)
        self._unknown.pop(key_id, None)
        self._loading.pop(key_id, None)  # later requests start a fresh lookup; the old one caches nothing
        for token in [t for t, (p, _) in self._verified.items() if p.key_id == key_id]:
            del self._verified[token]

    def known(self, headers: Mapping[str, str]) -> Principal | None:
        """The principal without awaiting anything, when auth is off or the key was verified within the TTL."""
        if not self.cfg.enabled:
            return self.anonymous
        return self._seen(bearer(headers))

    def _seen(self, token: str | None) -> Principal | None:
        seen = self._verified.get(token) if token is not None else None
        if seen is not None and seen[1] > time.monotonic():
            return seen[0]
        return None

    async def authenticate(self, headers: Mapping[str, str], client: str | None = None) -> Principal:
        """The key's principal; `client` is the client's address, for the allowance of lookups of unknown ids."""
        if not self.cfg.enabled:
            return self.anonymous
        token = bearer(headers)
        if token is None:
            if conflicting(bearer_token(headers.get("authorization")), headers):
                raise Unauthorized(CONFLICT, code="conflicting_api_keys")
            raise Unauthorized(MISSING)
        # A key seen within the TTL skips parsing and hashing (the store row is cached just as long).
        seen = self._seen(token)
        if seen is not None:
            return seen
        parsed = parse_key(token)
        if parsed is None:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        kid, secret = parsed
        charged = self._charge(kid, client)
        generation = self._generation.get(kid, 0)
        entry = await self._entry(kid)
        if charged and entry.row is not None:
            self.gate.refund(client)
        if self._generation.get(kid, 0) != generation:  # forgotten while we waited: ask again
            return await self.authenticate(headers, client)
        row = entry.row
        if row is None or not hmac.compare_digest(row.hash, hash_secret(self.pepper, secret)):
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        if row.revoked_at is not None:
            raise KeyNotValid("This API key has been revoked.", kid, code="key_revoked")
        if row.expires_at is not None and row.expires_at <= time.time():
            raise KeyNotValid("This API key has expired.", kid, code="key_expired")
        assert entry.principal is not None
        # Verified tokens skip the entry until its refresh is due, so that a request then starts the refresh.
        until = min(entry.until, entry.refresh_at)
        if row.expires_at is not None:  # never past the key's own expiry
            until = min(until, time.monotonic() + row.expires_at - time.time())
        self._verified[token] = (entry.principal, until)
        self._verified.move_to_end(token)
        if len(self._verified) > _MAX_CACHE:
            self._verified.popitem(last=False)  # the least recently verified; never the whole table
        return entry.principal

    def _charge(self, kid: str, client: str | None) -> bool:
        """Whether the request is about to look up an id this replica holds nothing for, which costs the client's
        address one of its allowance (`LookupGate`); past the allowance, 429 without asking the store."""
        if self.store is None or kid in self._cache or kid in self._loading:
            return False  # nothing to ask, a known key, or a lookup already running (joined, not repeated)
        unknown = self._unknown.get(kid)
        if (unknown is not None and unknown.until > time.monotonic()) or self.static.get(kid) is not None:
            return False  # answered without the store
        wait = self.gate.take(client)
        if wait > 0:
            raise RateLimited(
                "Too many requests with unknown API keys from this address; retry later.",
                headers={"retry-after": str(math.ceil(wait))},
                reason="unknown_key",
            )
        return True

    async def _entry(self, kid: str) -> _Entry:
        entry = self._cache.get(kid)
        if entry is not None:
            self._cache.move_to_end(kid)  # recently used: the last to be pushed out
        else:
            entry = self._unknown.get(kid)
        now = time.monotonic()
        if entry is not None and entry.until > now:
            if now >= entry.refresh_at:
                self._lookup(kid, entry)  # ahead of expiry, in the background: busy keys never wait
            return entry
        running = kid in self._loading
        loading = self._lookup(kid, entry)
        stale = entry if entry is not None and entry.row is not None and self._within_max_stale(entry, now) else None
        if stale is not None and (self._serving_stale or running):
            # The store is known to be down, or was asked ahead of expiry and has not answered in half a TTL:
            # the key's last known state, at once, while the lookup goes on.
            self.stale_served += 1
            return stale
        try:
            return await asyncio.wait_for(asyncio.shield(loading), self.cfg.lookup_timeout)
        except TimeoutError:
            self._store_down(f"no answer within auth.lookup_timeout ({self.cfg.lookup_timeout:g} s)")
            if stale is None:
                raise StoreUnavailable("The key store is unavailable; retry shortly.") from None
            self.stale_served += 1
            return stale

    def _within_max_stale(self, entry: _Entry, now: float) -> bool:
        return now - entry.fetched <= self.cfg.max_stale

    def _lookup(self, kid: str, entry: _Entry | None) -> asyncio.Task[_Entry]:
        """The key's store lookup, started if none is running. One per key at a time: when a busy key's entry
        expires, every request in flight would otherwise query the store at once. It is a task of its own, so
        a caller that stops waiting (or goes away) does not cancel it for the others."""
        loading = self._loading.get(kid)
        if loading is None:
            loading = self._loading[kid] = asyncio.get_running_loop().create_task(self._load(kid, entry))
            loading.add_done_callback(lambda task: self._loaded(kid, task))
        return loading

    def _loaded(self, kid: str, task: asyncio.Task[_Entry]) -> None:
        if self._loading.get(kid) is task:  # `forget` may have started a newer lookup since
            del self._loading[kid]
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have left before it finished

    async def _load(self, kid: str, entry: _Entry | None) -> _Entry:
        for _ in range(3):
            generation = self._generation.get(kid, 0)
            now = time.monotonic()
            row = self.static.get(kid)
            static = row is not None
            asked = row is None and not (entry is not None and entry.static) and self.store is not None
            try:
                if asked:
                    assert self.store is not None
                    row = await self.store.get_key(kid)
            except StoreError as exc:
                return self._stale(kid, entry, exc)
            ttl = self.cfg.cache_ttl
            principal = self.principal_for(row) if row else None
            fresh = _Entry(row, principal, now + ttl, now, static, refresh_at=now + ttl / 2)
            if self._generation.get(kid, 0) != generation:
                continue  # revoked or changed while we read it: what we read may be from before; read again
            if self._serving_stale and asked:  # only an answer of the store's says it is back (not a static key)
                self._serving_stale = False
                log.warning("key store answering again")
            self._remember(kid, fresh)
            return fresh
        raise StoreUnavailable("The key changed while it was being looked up; retry.")

    def _remember(self, kid: str, entry: _Entry) -> None:
        """Cache the entry in its table (a key, or an id with none), each an LRU: at its bound the least recently
        used entry goes, never the table. Forged ids thus only push out each other."""
        known = entry.row is not None
        table, other, bound = (
            (self._cache, self._unknown, _MAX_CACHE) if known else (self._unknown, self._cache, _MAX_UNKNOWN)
        )
        other.pop(kid, None)
        table[kid] = entry
        table.move_to_end(kid)
        if len(table) > bound:
            table.popitem(last=False)

    def _stale(self, kid: str, entry: _Entry | None, exc: StoreError) -> _Entry:
        """The store did not answer: the last known state of a key it confirmed within `max_stale`, else 503."""
        now = time.monotonic()
        self._store_down(str(exc))
        if entry is None or not self._within_max_stale(entry, now):
            raise StoreUnavailable("The key store is unavailable; retry shortly.") from None
        # Asked again (in the background) after the cache TTL, and never served past max_stale since the store
        # last confirmed it.
        entry.until = min(now + self.cfg.cache_ttl, entry.fetched + self.cfg.max_stale)
        entry.refresh_at = min(now + self.cfg.cache_ttl, entry.until)
        return entry

    def _store_down(self, error: str) -> None:
        if not self._serving_stale:
            self._serving_stale = True
            log.warning(
                "key store unavailable: serving cached keys for up to auth.max_stale",
                extra={"fields": {"max_stale_s": self.cfg.max_stale, "error": error[:200]}},
            )

    def principal_for(self, row: KeyRow) -> Principal:
        """A key's row as a principal: its limits, the configured ones where it sets none."""
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
            row.budget_tokens if row.budget_period else None,
            row.budget_period,
            row.weight if row.weight is not None else 1.0,
            row.priority or "normal",
            row.cache_group,
        )
