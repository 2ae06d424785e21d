"""Authenticator on a real SQLite store: refresh ahead of expiry, stale-while-revalidate within max_stale, the
store's outage and return, unknown keys, and the verified-token cache. Closing the store is the outage: every
lookup then fails at once with a StoreError, as a refused connection does."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import orjson
import pytest

from sidecar.config import AuthCfg, LimitsCfg
from sidecar.errors import RateLimited, StoreUnavailable, Unauthorized
from sidecar.keys.auth import Authenticator, bearer, bearer_token
from sidecar.keys.format import format_key, new_key
from sidecar.keys.service import KeyAdmin
from sidecar.store import open_store
from sidecar.store.base import KeyRow
from sidecar.store.sqlite import SqliteStore

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
    assert bearer({"authorization": "Bearer k2", "x-api-key": "k1"}) is None  # two keys: neither (a 401)
    assert bearer({"authorization": "Bearer k2", "x-api-key": "k2"}) == "k2"
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


# --- exact values: errors, principals, the verified cache, stale counts and their log lines ---------------------
def busy(store, rows: int = 2_000_000):
    """A real query that keeps the store's connection busy for a while (~0.5-1 s): lookups queue behind it."""
    sql = f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) SELECT count(*) FROM c"
    return asyncio.ensure_future(store.db.execute(sql))


def test_check_model_names_the_model_refused():
    from sidecar.errors import Forbidden
    from sidecar.keys.auth import Principal

    p = Principal("id", "n", 1, 2, 3, frozenset({"a"}))
    with pytest.raises(Forbidden) as raised:
        p.check_model("b")
    assert (raised.value.message, raised.value.param, raised.value.code) == (
        "This key may not use model 'b'.", "model", "model_not_allowed",
    )  # fmt: skip
    with pytest.raises(Forbidden) as raised:
        p.check_model(None)
    assert raised.value.message == "This key may not use model None." and raised.value.param == "model"
    p.check_model("a")
    Principal("id", "n", 1, 2, 3).check_model("anything")


def test_bearer_token_edge_cases():
    assert bearer_token("Bearer a b") == "a b" and bearer_token("BEARER x") == "x"
    assert bearer_token("Bearer") is None and bearer_token("Bearerx y") is None and bearer_token("") is None
    assert bearer({}) is None and bearer({"authorization": "Bearer k"}) == "k"


async def test_refusals_carry_exact_messages_and_codes(store):
    from sidecar.keys.auth import MISSING
    from sidecar.keys.format import format_key, parse_key

    admin = KeyAdmin(store, PEPPER)
    good = await admin.create({"name": "g"}, actor="t")
    gone = await admin.create({"name": "r"}, actor="t")
    await admin.revoke(gone.row.id, actor="t")
    old = await admin.create({"name": "e", "expires_at": time.time() - 1}, actor="t")
    auth = Authenticator(AuthCfg(), LimitsCfg(), store, PEPPER)

    async def refusal(hdrs):
        with pytest.raises(Unauthorized) as raised:
            await auth.authenticate(hdrs)
        return raised.value.message, raised.value.code

    assert await refusal({}) == (MISSING, None)
    assert await refusal(headers("nonsense")) == ("Incorrect API key provided.", "invalid_api_key")
    kid, _ = parse_key(good.key)
    wrong_secret = format_key(kid, "A" * 32)
    assert await refusal(headers(wrong_secret)) == ("Incorrect API key provided.", "invalid_api_key")
    unknown, _, _ = new_key()
    assert await refusal(headers(unknown)) == ("Incorrect API key provided.", "invalid_api_key")
    assert await refusal(headers(gone.key)) == ("This API key has been revoked.", "key_revoked")
    assert await refusal(headers(old.key)) == ("This API key has expired.", "key_expired")
    assert (await auth.authenticate(headers(good.key))).key_id == good.row.id
    assert (await auth.authenticate({"x-api-key": good.key})).name == "g"
    assert auth.known(headers(wrong_secret)) is None and auth.known(headers(old.key)) is None
    assert auth.stale_served == 0


async def test_a_principal_carries_the_row_s_audit_and_zero_limits(store):
    admin = KeyAdmin(store, PEPPER)
    on = await admin.create({"name": "on", "audit": "on", "rpm": 0, "tpm": 0, "concurrency": 0}, actor="t")
    auth = Authenticator(AuthCfg(), LimitsCfg(concurrency=7, rpm=8, tpm=9), store, PEPPER)
    p = await auth.authenticate(headers(on.key))
    assert (p.key_id, p.name, p.concurrency, p.rpm, p.tpm, p.models, p.audit) == (
        on.row.id, "on", 0, 0, 0, None, "on",
    )  # fmt: skip
    assert auth.anonymous.name == "anonymous" and auth.anonymous.key_id is None and auth.anonymous.audit is None


async def test_a_verified_token_is_never_trusted_past_the_key_s_expiry(store):
    created = await KeyAdmin(store, PEPPER).create({"name": "k", "expires_at": time.time() + 0.4}, actor="t")
    auth = Authenticator(AuthCfg(cache_ttl=30), LimitsCfg(), store, PEPPER)
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
    assert auth.known(headers(created.key)) is not None
    await asyncio.sleep(0.45)
    assert auth.known(headers(created.key)) is None
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(created.key))
    assert raised.value.code == "key_expired"


async def test_forget_drops_that_key_only_and_a_revoke_is_seen_at_once(store):
    admin = KeyAdmin(store, PEPPER)
    a = await admin.create({"name": "a"}, actor="t")
    b = await admin.create({"name": "b"}, actor="t")
    auth = Authenticator(AuthCfg(cache_ttl=30), LimitsCfg(), store, PEPPER)
    auth.forget("never-seen")  # nothing cached, nothing in flight: no error
    await auth.authenticate(headers(a.key))
    await auth.authenticate(headers(b.key))
    await admin.revoke(a.row.id, actor="t")
    assert (await auth.authenticate(headers(a.key))).key_id == a.row.id  # cached: another replica's revoke
    auth.forget(a.row.id)
    assert auth.known(headers(a.key)) is None and auth.known(headers(b.key)) is not None
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(a.key))
    assert raised.value.code == "key_revoked"
    assert (await auth.authenticate(headers(b.key))).key_id == b.row.id


async def test_a_forget_during_a_lookup_makes_it_look_again(store):
    admin = KeyAdmin(store, PEPPER)
    a = await admin.create({"name": "a"}, actor="t")
    auth = Authenticator(AuthCfg(cache_ttl=30, lookup_timeout=30), LimitsCfg(), store, PEPPER)
    hold = busy(store)
    await asyncio.sleep(0.05)
    request = asyncio.ensure_future(auth.authenticate(headers(a.key)))
    await asyncio.sleep(0.05)  # its lookup waits behind the busy query
    auth.forget(a.row.id)  # what it reads may be from before: it reads again, and the request asks again
    await hold
    assert (await request).key_id == a.row.id
    assert auth.known(headers(a.key)) is not None


async def test_stale_serving_is_counted_and_logged_once_with_its_cause(store, log_catcher):
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.2, max_stale=60), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    await store.close()
    await asyncio.sleep(0.25)  # past the TTL: this request waits for the lookup, which fails at once
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
    assert auth.stale_served == 0  # answered by the lookup itself (its last known state)
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id  # verified: no lookup
    down = [line for line in log_catcher.lines if "key store unavailable" in line]
    assert down == [
        "key store unavailable: serving cached keys for up to auth.max_stale"
        "{'max_stale_s': 60, 'error': 'store is not open'}"
    ]
    for n in (1, 2):
        await asyncio.sleep(0.25)  # the store is known to be down: served at once, looked up in the background
        assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
        assert auth.stale_served == n
        await asyncio.sleep(0.05)  # the background lookup fails and extends the entry by a TTL
        assert (await auth.authenticate(headers(created.key))).key_id == created.row.id  # entry extended
        assert auth.stale_served == n
    assert sum("key store unavailable" in line for line in log_catcher.lines) == 1
    assert not any("answering again" in line for line in log_catcher.lines)


async def test_the_store_down_log_line_keeps_200_characters_of_the_error(log_catcher):
    auth = Authenticator(AuthCfg(max_stale=7), LimitsCfg(), None, PEPPER)
    auth._store_down("e" * 300)
    auth._store_down("second")
    lines = [line for line in log_catcher.lines if "key store unavailable" in line]
    assert lines == [
        "key store unavailable: serving cached keys for up to auth.max_stale"
        f"{{'max_stale_s': 7, 'error': '{'e' * 200}'}}"
    ]


async def test_an_unknown_key_waits_at_most_lookup_timeout_for_a_busy_store(store, log_catcher):
    auth = Authenticator(AuthCfg(lookup_timeout=0.1), LimitsCfg(), store, PEPPER)
    unknown, _, _ = new_key()
    hold = busy(store)
    await asyncio.sleep(0.02)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await auth.authenticate(headers(unknown))
    assert time.monotonic() - t0 < 0.4
    assert raised.value.message == "The key store is unavailable; retry shortly."
    assert [line for line in log_catcher.lines if "key store unavailable" in line] == [
        "key store unavailable: serving cached keys for up to auth.max_stale"
        "{'max_stale_s': 300.0, 'error': 'no answer within auth.lookup_timeout (0.1 s)'}"
    ]
    await hold
    await settle()
    assert auth.stale_served == 0


async def test_a_known_key_past_its_ttl_waits_lookup_timeout_then_is_served_stale(store):
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.1, lookup_timeout=0.15), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    await asyncio.sleep(0.12)
    hold = busy(store)
    await asyncio.sleep(0.02)
    t0 = time.monotonic()
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
    waited = time.monotonic() - t0
    assert 0.1 <= waited < 0.45 and auth.stale_served == 1
    t0 = time.monotonic()  # the store is now known to be slow: the next request does not wait
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
    assert time.monotonic() - t0 < 0.05 and auth.stale_served == 2
    await hold
    await settle()


async def test_a_refresh_ahead_that_fails_past_max_stale_leaves_no_unretrieved_error(store, log_catcher):
    import gc

    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=1.0, max_stale=0.05), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    await store.close()
    await asyncio.sleep(0.55)  # refresh due, entry still valid, past max_stale: the background lookup fails
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id
    await settle()
    gc.collect()
    await settle()
    assert not any("never retrieved" in line for line in log_catcher.lines)


async def test_a_static_key_verifies_without_the_store_and_stops_when_it_leaves_the_file(store, tmp_path, log_catcher):
    from sidecar.keys.format import format_key, hash_secret
    from sidecar.keys.static import StaticKeys

    kid, secret = "abcdefabcdef", "S" * 32
    key = format_key(kid, secret)
    row = {"id": kid, "name": "static", "hash": hash_secret(PEPPER, secret), "created_at": 1.0, "rpm": 3}
    path = tmp_path / "static.jsonl"
    path.write_text(orjson.dumps(row).decode() + "\n")
    stored = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=0.2, max_stale=60), LimitsCfg(), store, PEPPER, StaticKeys(str(path)))
    p = await auth.authenticate(headers(key))
    assert (p.key_id, p.name, p.rpm) == (kid, "static", 3)
    await auth.authenticate(headers(stored.key))
    await store.close()
    await asyncio.sleep(0.25)
    await auth.authenticate(headers(stored.key))  # the store is down (logged)
    assert (await auth.authenticate(headers(key))).key_id == kid  # the static file still answers
    await settle()
    assert not any("answering again" in line for line in log_catcher.lines)  # a static key says nothing of it
    path.write_text("")
    await asyncio.sleep(1.05)
    await auth.authenticate(headers(key))  # the store is down: its last state, while the file is read again
    await settle()
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(key))  # gone from the file: not served stale, not asked of the store
    assert raised.value.code == "invalid_api_key"
    assert auth.static.get(kid) is None


async def test_no_store_and_no_static_key_is_a_401():
    auth = Authenticator(AuthCfg(), LimitsCfg(), None, PEPPER)
    unknown, _, _ = new_key()
    with pytest.raises(Unauthorized) as raised:
        await auth.authenticate(headers(unknown))
    assert raised.value.code == "invalid_api_key"


class CountingStore(SqliteStore):
    """The real SQLite store, counting the key lookups it answers."""

    lookups = 0

    async def get_key(self, key_id: str) -> KeyRow | None:
        self.lookups += 1
        return await super().get_key(key_id)


@pytest.fixture
async def counted(tmp_path):
    store = CountingStore(f"{tmp_path}/counted.db")
    await store.open()
    await store.migrate()
    yield store
    await store.close()


def forged(i: int) -> str:
    """A well-formed key (its checksum right) whose id no store holds."""
    return format_key(f"{i:012d}", "A" * 32)


async def refusals(auth: Authenticator, keys: list[str]) -> Counter[int]:
    """Each key tried once, a thousand at a time: how many got which status."""
    seen: Counter[int] = Counter()

    async def one(key: str) -> None:
        try:
            await auth.authenticate(headers(key))
        except Unauthorized as err:
            seen[err.status] += 1
        except RateLimited as err:
            assert int(err.headers["retry-after"]) >= 1
            seen[err.status] += 1

    for start in range(0, len(keys), 1000):
        await asyncio.gather(*(one(key) for key in keys[start : start + 1000]))
    return seen


async def test_a_flood_of_forged_keys_costs_the_store_a_bounded_number_of_lookups_and_evicts_no_key(counted):
    """101,000 forged keys, past the 100,000 entries at which the old cache was cleared whole (a real key's last
    known state with it, so a store outage then refused it) and each one a lookup before: now the store is asked
    for at most the shared allowance (10 x 60 a minute, and what refills meanwhile), the rest get 429 without a
    lookup, and the real key verified before the flood is still served through a store outage."""
    store = counted
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=1.0, max_stale=600), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    began, asked = time.monotonic(), store.lookups
    seen = await refusals(auth, [forged(i) for i in range(101_000)])
    lookups = store.lookups - asked
    refill = math.ceil((time.monotonic() - began) * 10)  # the shared bucket's 10 a second
    assert lookups <= 600 + refill and seen[401] == lookups and seen[429] == 101_000 - lookups
    await asyncio.sleep(1.1)  # the real key's entry is past its TTL: its next request asks the store...
    await store.close()  # ...which is gone: the entry the flood did not push out serves it
    assert (await auth.authenticate(headers(created.key))).key_id == created.row.id


async def test_unknown_ids_are_an_lru_of_their_own_that_never_pushes_out_a_key(counted):
    """With the allowance off, 10,500 forged ids each cost a lookup and fill the table of unknown ids past its
    bound of 10,000: its oldest entries go (asked again: a lookup), its newest stay (no lookup), and the real
    key's entry, the oldest of all but in a table of its own, stays (a wrong secret for its id: no lookup)."""
    store = counted
    created = await KeyAdmin(store, PEPPER).create({"name": "k"}, actor="test")
    auth = Authenticator(AuthCfg(cache_ttl=60, unknown_key_rate=0), LimitsCfg(), store, PEPPER)
    await auth.authenticate(headers(created.key))
    assert await refusals(auth, [forged(i) for i in range(10_500)]) == {401: 10_500}
    asked = store.lookups
    assert await refusals(auth, [format_key(created.row.id, "B" * 32)]) == {401: 1} and store.lookups == asked
    assert await refusals(auth, [forged(10_499)]) == {401: 1} and store.lookups == asked
    assert await refusals(auth, [forged(0)]) == {401: 1} and store.lookups == asked + 1
