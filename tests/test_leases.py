"""Leases: a stateful model check of the manager, then the real proxy under concurrency and cancellation."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sidecar.app import LIMITS, PROXY
from sidecar.config import LimitsCfg
from sidecar.errors import RateLimited
from sidecar.keys.auth import Principal
from sidecar.limits.local import LocalLimits
from tests.support import bodies as common
from tests.support.bodies import MAX_TOKENS
from tests.support.waits import wait_for

ADMIN = "admin-token-0123456789"
CHAT = {**common.CHAT, "max_tokens": 20}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseMachine(RuleBasedStateMachine):
    """acquire / complete / fail / disconnect / timeout / cancel in any order, any clock."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.manager = LocalLimits(LimitsCfg(), clock=self.clock)
        self.principal = Principal("k1", "k", concurrency=3, rpm=20, tpm=500)
        self.live: list = []
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        self.loop.close()

    @rule(estimate=st.integers(0, 800))
    def acquire(self, estimate):
        before = self.manager.totals()
        state = self.manager.state_for(self.principal)
        state.requests.refill(self.clock.now)  # bring the buckets up to now: a reject must then take nothing
        state.tokens.refill(self.clock.now)
        levels = (state.requests.level, state.tokens.level)
        try:
            lease = self.loop.run_until_complete(self.manager.acquire(self.principal, estimate))
        except RateLimited as exc:
            assert self.manager.totals() == before  # a rejected request changes no counter
            assert (state.requests.level, state.tokens.level) == levels
            assert int(exc.headers["retry-after"]) >= 1
            return
        self.live.append(lease)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), prompt=st.integers(0, 600), completion=st.integers(0, 600))
    def complete(self, data, prompt, completion):
        lease = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        lease.settle(prompt, completion)
        lease.settle(prompt, completion)  # settling twice changes nothing
        lease.release()

    @precondition(lambda self: self.live)
    @rule(data=st.data(), kind=st.sampled_from(["fail", "disconnect", "timeout", "cancel"]))
    def end_abnormally(self, data, kind):
        lease = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        if kind == "disconnect":
            lease.settle(None, data.draw(st.integers(0, 50)))  # partial, counted usage
        lease.release()
        lease.release()  # release is idempotent

    @rule(seconds=st.floats(0, 120))
    def time_passes(self, seconds):
        self.clock.now += seconds

    @invariant()
    def reservations_match_live_leases(self):
        active, reserved = self.manager.totals()
        assert active == len(self.live) <= 3
        assert reserved == sum(lease.reserved for lease in self.live) >= 0

    @invariant()
    def budgets_never_exceed_capacity(self):
        state = self.manager.state_for(self.principal)
        assert state.requests.level <= 20 and state.tokens.level <= 500


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


async def test_retry_after_is_truthful():
    clock = Clock()
    manager = LocalLimits(LimitsCfg(), clock=clock)
    p = Principal("k", "k", concurrency=0, rpm=2, tpm=0)
    for _ in range(2):
        (await manager.acquire(p, 0)).release()
    with pytest.raises(RateLimited) as info:
        await manager.acquire(p, 0)
    retry = int(info.value.headers["retry-after"])
    assert info.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += retry - 0.5
    with pytest.raises(RateLimited):
        await manager.acquire(p, 0)
    clock.now += 0.5
    (await manager.acquire(p, 0)).release()


async def test_token_budget_is_reconciled_to_real_usage():
    clock = Clock()
    manager = LocalLimits(LimitsCfg(), clock=clock)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=1000)
    lease = await manager.acquire(p, 900)
    with pytest.raises(RateLimited) as info:
        await manager.acquire(p, 200)
    assert info.value.type == "tokens" and info.value.code == "rate_limit_exceeded"
    lease.settle(50, 50)  # used 100 of the 900 reserved: 800 refunded
    lease.release()
    assert manager.state_for(p).tokens.level == pytest.approx(900)
    (await manager.acquire(p, 800)).release()


async def test_global_cap_queues_then_rejects():
    manager = LocalLimits(LimitsCfg(global_concurrency=1, queue_size=1, queue_timeout=0.2))
    p = Principal(None, "a", 0, 0, 0)
    first = await manager.acquire(p, 0)
    waiting = asyncio.create_task(manager.acquire(p, 0))
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimited) as info:  # the queue is full: rejected at once
        await manager.acquire(p, 0)
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"
    first.release()
    second = await waiting  # handed the slot
    assert manager.global_active == 1
    with pytest.raises(RateLimited):  # waits its 0.2 s in the queue, then gives up
        await manager.acquire(p, 0)
    # A waiter cancelled while queued holds nothing, and the slot it would have had goes to the next one.
    queued = asyncio.create_task(manager.acquire(p, 0))
    await asyncio.sleep(0.01)
    queued.cancel()
    second.release()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert manager.global_active == 0
    (await manager.acquire(p, 0)).release()
    assert manager.global_active == 0


async def make_key(s, url, **fields):
    async with s.post(
        url + "/admin/keys", json={"name": "t", **fields}, headers={"authorization": f"Bearer {ADMIN}"}
    ) as r:
        assert r.status == 201
        return (await r.json())["key"]


@pytest.fixture
async def limited(fake, sidecar_factory):
    return await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN)


async def test_200_streams_against_concurrency_8(fake, limited):
    fake.script.chunks, fake.script.delay_chunks = 10, 0.02
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        key = await make_key(s, limited.url, concurrency=8, rpm=100000, tpm=10**9)

        async def one():
            async with s.post(
                limited.url + "/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={"authorization": f"Bearer {key}"},
            ) as r:
                body = await r.read()
                return r.status, r.headers, body

        results = await asyncio.gather(*(one() for _ in range(200)))
    statuses = [status for status, _, _ in results]
    assert fake.max_in_flight <= 8
    assert statuses.count(200) >= 8 and statuses.count(200) + statuses.count(429) == 200
    for status, headers, body in results:
        if status == 429:
            assert headers["retry-after"] == "1" and b"rate_limit_exceeded" in body
        else:
            assert body.endswith(b"data: [DONE]\n\n") and "x-ratelimit-limit-requests" in headers
    await wait_for(lambda: len(limited.rows) == 200)
    assert limited.server.app[LIMITS].local.totals() == (0, 0)
    assert not limited.server.app[PROXY].in_flight.tasks


async def test_rate_limit_headers_and_429_shape(fake, limited):
    async with aiohttp.ClientSession() as s:
        key = await make_key(s, limited.url, rpm=2, tpm=100000)
        headers = {"authorization": f"Bearer {key}"}
        async with s.post(limited.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200
            assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "1"
            assert r.headers["x-ratelimit-limit-tokens"] == "100000"
            assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        async with s.post(limited.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 200
        async with s.post(limited.url + "/v1/chat/completions", json=CHAT, headers=headers) as r:
            assert r.status == 429
            body = await r.json()
            assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
            # 2 requests a minute: the next one is 30 s away, less the moment since the first (rounded up)
            assert 29 <= int(r.headers["retry-after"]) <= 30
    assert len(fake.received) == 2 and limited.rows[-1]["outcome"] == "rate_limited"


async def test_token_reservations_over_http_admit_what_the_arithmetic_allows_and_refund(fake, limited):
    """Five slow streams at max_tokens=300 against a tpm with room for three reservations: exactly three run,
    two are refused as `tokens`; once they end, each refunds what it reserved and did not use."""
    from sidecar.wire.tokens import estimate_prompt

    fake.script.chunks, fake.script.delay_chunks = 5, 0.1  # 0.5 s each: all five overlap
    body = {**CHAT, "stream": True, "max_tokens": 300}
    reservation = estimate_prompt(body) + 300
    tpm = 3 * reservation + reservation // 2
    refill = tpm / 60  # tokens a second
    async with aiohttp.ClientSession() as s:
        key = await make_key(s, limited.url, rpm=100000, tpm=tpm)
        headers = {"authorization": f"Bearer {key}"}

        async def one():
            async with s.post(limited.url + "/v1/chat/completions", json=body, headers=headers) as r:
                return r.status, r.headers, await r.read()

        results = await asyncio.gather(*(one() for _ in range(5)))
        admitted = sorted(int(h["x-ratelimit-remaining-tokens"]) for st, h, _ in results if st == 200)
        refused = [orjson.loads(b)["error"] for st, _, b in results if st == 429]
        assert len(admitted) == 3 and len(refused) == 2
        assert all(e["type"] == "tokens" and e["code"] == "rate_limit_exceeded" for e in refused)
        for i, remaining in enumerate(reversed(admitted), start=1):  # each one's reservation taken, in turn
            assert tpm - i * reservation <= remaining <= tpm - i * reservation + refill
        used = fake.script.prompt_tokens + fake.script.chunks  # the fake's usage per answer
        async with s.post(limited.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            remaining = int(r.headers["x-ratelimit-remaining-tokens"])
            await r.read()
    # refunded: three answers cost `used` each, not their reservation (without refunds: tpm - 4 reservations)
    assert tpm - 3 * used - reservation <= remaining <= tpm - reservation
    await wait_for(lambda: limited.server.app[LIMITS].local.totals() == (0, 0))


@pytest.mark.parametrize(("raw", "passes", "reserved"), MAX_TOKENS, ids=[m[0].decode() for m in MAX_TOKENS])
async def test_max_tokens_values_reach_the_upstream_or_are_refused_as_the_table_says(
    fake, limited, raw, passes, reserved
):
    body = b'{"model":"m","messages":[],"max_tokens":' + raw + b"}"
    async with aiohttp.ClientSession() as s:
        key = await make_key(s, limited.url)
        async with s.post(
            limited.url + "/v1/chat/completions",
            data=body,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        ) as r:
            if passes:
                assert r.status == 200 and fake.last().body == body  # the upstream's to judge, unchanged
            else:
                assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
                assert fake.received == []
    assert limited.server.app[LIMITS].local.totals() == (0, 0)


async def test_cancellation_at_every_await_point_leaves_nothing_behind(fake, limited):
    """Cancel the server's handler task at many moments: body read, lease, upstream headers, mid-stream."""
    fake.script.chunks, fake.script.delay_chunks, fake.script.delay_headers = 6, 0.01, 0.02
    proxy = limited.server.app[PROXY]
    async with aiohttp.ClientSession() as s:
        key = await make_key(s, limited.url, concurrency=4, rpm=10**6, tpm=10**9)
        for i in range(30):
            delay = i * 0.004

            async def request():
                async with s.post(
                    limited.url + "/v1/chat/completions",
                    json={**CHAT, "stream": i % 2 == 0},
                    headers={"authorization": f"Bearer {key}"},
                ) as r:
                    return await r.read()

            client = asyncio.create_task(request())
            await asyncio.sleep(delay)
            for task in list(proxy.in_flight.tasks):
                task.cancel()
            with contextlib.suppress(aiohttp.ClientError):
                await client
            await wait_for(lambda: not proxy.in_flight.tasks)
            assert limited.server.app[LIMITS].local.totals() == (0, 0), f"leak after cancel at {delay:.3f}s"
    await wait_for(lambda: len(limited.rows) == 30)
