"""Authenticator on a real SQLite store: refresh ahead of expiry, stale-while-revalidate within max_stale, the
store's outage and return, unknown keys, and the verified-token cache. Closing the store is the outage: every
lookup then fails at once with a StoreError, as a refused connection does."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.auth import Authenticator, bearer, bearer_token
from sidecar.config import AuthCfg, LimitsCfg
from sidecar.errors import StoreUnavailable, Unauthorized
from sidecar.keys import KeyAdmin, new_key
from sidecar.store import open_store

PEPPER = b"p" * 32


@pytest.fixture
async def store(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    await store.open()
    await store.migrate()
    yield store
    await store.close()


def headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def settle() -> None:
    """Let background lookups finish (SQLite answers within milliseconds)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_a_key_in_use_is_refreshed_ahead_of_expiry(store):
    """Half a TTL on, a request is served from the cache and starts a lookup: a revoke made meanwhile (on
    another replica: no forget here) is seen before the TTL is over."""
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.4), LimitsCfg(), store, PEPPER)
    principal = await auth.authenticate(headers(created.key))
    assert principal.key_id == created.row.id and principal.name == "k"
    await KeyAdmin(store, PEPPER).revoke(created.row.id, actor="other-replica")
    await asyncio.sleep(0.25)  # past half the TTL, before its end
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id  # still cached
    await settle()
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(created.key))  # at ~0.45 s: the refresh started at 0.25 s saw the revoke
    assert raised.value.code == "key_revoked"


async def test_a_verified_token_skips_the_store_until_its_refresh_is_due(store):
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.4), LimitsCfg(), store, PEPPER)
    assert auth.known(headers(created.key)) is None  # never verified
    await auth.authenticate(headers(created.key))
    assert auth.known(headers(created.key)) is not None  # verified: no await needed
    await asyncio.sleep(0.25)
    assert auth.known(headers(created.key)) is None  # its refresh is due: the next request goes through it


async def test_a_closed_store_serves_known_keys_at_once_until_max_stale_then_fails_closed(store):
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.1, max_stale=0.6), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    unknown, _, _ = new_key()
    await store.close()  # the outage
    await asyncio.sleep(0.15)
    served = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.35:
        t0 = time.monotonic()
        assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
        assert time.monotonic() - t0 < 0.05  # never waits on the store
        served += 1
        await asyncio.sleep(0.02)
    assert served > 5 and auth.stale_served >= 1
    with pytest.raises(StoreUnavailable):
        await auth.authenticate(headers(unknown))  # a key never seen: no last state to serve
    await asyncio.sleep(0.3)  # past max_stale since the store last confirmed it
    with pytest.raises(StoreUnavailable):
        await auth.authenticate(headers(created.key))


async def test_the_store_back_is_noticed_and_logged_once(store, log_catcher):
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.1, max_stale=60), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    await store.close()
    for _ in range(5):
        await asyncio.sleep(0.12)
        await auth.authenticate(headers(created.key))
        await settle()
    await store.open()
    await asyncio.sleep(0.12)
    await auth.authenticate(headers(created.key))
    await settle()
    await asyncio.sleep(0.12)
    await auth.authenticate(headers(created.key))
    lines = log_catcher.lines
    assert sum("key store unavailable" in line for line in lines) == 1
    assert sum("key store answering again" in line for line in lines) == 1


async def test_lookup_timeout_bounds_the_wait_for_an_unknown_key(store):
    """An unknown key waits for the store at most auth.lookup_timeout (here the store answers at once: the key
    is simply unknown, a 401, well within it)."""
    auth = Authenticator(AuthCfg(lookup_timeout=0.5), LimitsCfg(), store, PEPPER)
    unknown, _, _ = new_key()
    t0 = time.monotonic()
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(unknown))
    assert raised.value.code == "invalid_api_key" and time.monotonic() - t0 < 0.5


async def test_missing_malformed_and_anonymous(store):
    auth = Authenticator(AuthCfg(), LimitsCfg(concurrency=3, rpm=4, tpm=5), store, PEPPER)
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate({})
    assert raised.value.code is None and "You didn't provide an API key" in raised.value.message
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers("sk-not-a-key"))
    assert raised.value.code == "invalid_api_key"
    off = Authenticator(AuthCfg(enabled=False), LimitsCfg(concurrency=3, rpm=4, tpm=5), store, PEPPER)
    anonymous = await off.authenticate({})
    assert (anonymous.key_id, anonymous.name, anonymous.concurrency, anonymous.rpm, anonymous.tpm) == (
        None, "anonymous", 3, 4, 5,
    )  # fmt: skip
    assert off.known({}) is anonymous


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert bearer({"x-api-key": "k1"}) == "k1"
    assert bearer({"authorization": "Bearer k2", "x-api-key": "k1"}) == "k2"
    assert bearer({"authorization": "Basic zzz", "x-api-key": "k1"}) is None  # an authorization header decides
    assert bearer({"x-api-key": ""}) is None


async def test_a_key_s_limits_and_models_come_from_its_row_or_the_defaults(store):
    admin = KeyAdmin(store, PEPPER)
    limited = await admin.create({"name": "l", "concurrency": 2, "rpm": 3, "tpm": 4, "models": ["a"]}, actor="t")
    default = await admin.create({"name": "d"}, actor="t")
    auth = Authenticator(AuthCfg(), LimitsCfg(concurrency=7, rpm=8, tpm=9), store, PEPPER)
    p = await auth.authenticate(headers(limited.key))
    assert (p.concurrency, p.rpm, p.tpm, p.models) == (2, 3, 4, frozenset({"a"}))
    p.check_model("a")
    with pytest.raises(Exception) as raised:
        p.check_model("b")
    assert raised.value.status == 403 and raised.value.param == "model"
    with pytest.raises(Exception):
        p.check_model(None)
    d = await auth.authenticate(headers(default.key))
    assert (d.concurrency, d.rpm, d.tpm, d.models) == (7, 8, 9, None)
    d.check_model(None)  # no list: any model, or none
