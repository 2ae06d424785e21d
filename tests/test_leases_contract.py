"""Leases, value by value: bucket arithmetic, the exact x-ratelimit-* headers, refunds, the global cap's fast path
(`acquire_now`), usage-report leases (`acquire_local`), the rejections' shape and the metrics `collect` exposes.

The clock is a plain number that only moves when a test moves it, so every value here is exact.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.config import LimitsCfg
from sidecar.errors import Overloaded, RateLimited
from sidecar.keys.auth import Principal
from sidecar.limits.local import KEY_IDLE, Bucket, LocalLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(**cfg) -> tuple[LocalLimits, Clock]:
    clock = Clock()
    return LocalLimits(LimitsCfg(**cfg), clock=clock), clock


def full_headers(rpm: int, left_requests: int, reset_requests: str, tpm: int, left_tokens: int, reset_tokens: str):
    return {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(left_requests),
        "x-ratelimit-reset-requests": reset_requests,
        "x-ratelimit-limit-tokens": str(tpm),
        "x-ratelimit-remaining-tokens": str(left_tokens),
        "x-ratelimit-reset-tokens": reset_tokens,
    }


def test_bucket_wait_and_reset_are_exact():
    bucket = Bucket(120, now=0.0)  # 2 per second
    assert (bucket.limit_text, bucket.capacity, bucket.level) == ("120", 120.0, 120.0)
    assert bucket.wait_for(0) == 0.0 and bucket.wait_for(50) == 0.0 and bucket.wait_for(120) == 0.0
    assert bucket.reset_in() == 0.0  # full: nothing to wait for
    bucket.level = 100.0
    assert bucket.wait_for(101) == 0.5
    assert bucket.reset_in() == 10.0  # 20 missing at 2 a second
    bucket.level = -10.0  # debited beyond zero by a settle
    assert bucket.wait_for(1) == 5.5
    assert bucket.reset_in() == 65.0
    bucket.refill(2.5)
    assert (bucket.level, bucket.stamp) == (-5.0, 2.5)
    bucket.refill(1.0)  # a clock reading from before the last refill changes nothing
    assert (bucket.level, bucket.stamp) == (-5.0, 2.5)
    bucket.refill(1000.0)  # never above capacity
    assert bucket.level == 120.0


def test_a_lease_carries_exact_rate_limit_headers():
    leases, _ = manager()
    p = Principal("k", "k", concurrency=0, rpm=120, tpm=600)
    lease = leases.acquire_now(p, 100)
    assert lease is not None and lease.reserved == 100
    # 1 of 120 requests taken at 2/s: back in 0.5 s; 100 of 600 tokens at 10/s: back in 10 s
    assert lease.headers == full_headers(120, 119, "0.500s", 600, 500, "10.000s")
    lease.release()
    # Only the budget a key has shows up.
    only_requests = leases.acquire_now(Principal("r", "r", 0, 60, 0), 5)
    assert only_requests.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1.000s",
    }
    only_tokens = leases.acquire_now(Principal("t", "t", 0, 0, 60), 6)
    assert only_tokens.headers == {
        "x-ratelimit-limit-tokens": "60",
        "x-ratelimit-remaining-tokens": "54",
        "x-ratelimit-reset-tokens": "6.000s",
    }
    assert leases.acquire_now(Principal("n", "n", 0, 0, 0), 6).headers == {}


def test_request_budget_rejection_shape():
    leases, clock = manager()
    p = Principal("k", "k", concurrency=0, rpm=120, tpm=600)
    for _ in range(120):
        leases.acquire_now(p, 0).release()
    with pytest.raises(RateLimited) as info:
        leases.acquire_now(p, 0)
    exc = info.value
    assert (exc.status, exc.type, exc.code) == (429, "requests", "rate_limit_exceeded")
    assert exc.message == "Rate limit reached: 120 requests per minute."
    # the next request is 0.5 s away: retry-after is whole seconds, at least 1
    assert exc.headers == {"retry-after": "1", **full_headers(120, 0, "60.000s", 600, 600, "0.000s")}
    assert leases.totals() == (0, 0) and leases.global_active == 0
    clock.now += 0.5
    lease = leases.acquire_now(p, 0)
    assert lease.headers["x-ratelimit-remaining-requests"] == "0"
    assert lease.headers["x-ratelimit-reset-requests"] == "60.000s"


def test_token_budget_admits_exactly_what_is_left_and_rejects_one_more():
    leases, clock = manager()
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    first = leases.acquire_now(p, 250)
    second = leases.acquire_now(p, 350)  # exactly the 350 left
    assert second.headers == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "60.000s",
    }
    with pytest.raises(RateLimited) as info:
        leases.acquire_now(p, 1)
    exc = info.value
    assert (exc.status, exc.type) == (429, "tokens")
    assert exc.message == "Rate limit reached: 600 tokens per minute; this request reserves 1."
    assert exc.headers == {  # 1 token is 0.1 s away
        "retry-after": "1",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "60.000s",
    }
    assert leases.totals() == (2, 600)
    # A request asking more than the capacity reserves the capacity; 30 s later 300 are back, 300 short of it.
    first.settle(250, 0)
    second.settle(350, 0)
    clock.now += 30
    with pytest.raises(RateLimited) as info:
        leases.acquire_now(p, 10**6)
    assert info.value.message == "Rate limit reached: 600 tokens per minute; this request reserves 600."
    assert info.value.headers["retry-after"] == "30"
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "300"


def test_concurrency_rejection_shape():
    leases, _ = manager()
    p = Principal("k", "k", concurrency=1, rpm=0, tpm=0)
    held = leases.acquire_now(p, 0)
    with pytest.raises(RateLimited) as info:
        leases.acquire_now(p, 0)
    exc = info.value
    assert (exc.status, exc.type, exc.code) == (429, "requests", "rate_limit_exceeded")
    assert exc.message == "Too many concurrent requests for this key (limit 1)."
    assert exc.headers == {"retry-after": "1"}
    assert leases.totals() == (1, 0) and leases.global_active == 1
    held.release()
    leases.acquire_now(p, 0).release()
    assert leases.totals() == (0, 0) and leases.global_active == 0


def test_settle_refunds_and_debits_exactly_once():
    leases, _ = manager()
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    tokens = leases.state_for(p).tokens
    a = leases.acquire_now(p, 300)
    assert tokens.level == 300 and leases.totals() == (1, 300)
    a.settle(None, 10)  # unknown prompt counts as 0
    assert tokens.level == 590 and a.reserved == 0
    assert leases.totals() == (1, 0)  # settled, still running: holds its slot, reserves nothing
    a.settle(100, 100)  # a second settle is a no-op
    assert tokens.level == 590
    a.release()
    assert tokens.level == 590 and leases.totals() == (0, 0)

    b = leases.acquire_now(p, 100)
    b.settle(20, None)  # unknown completion counts as 0
    assert tokens.level == 570
    b.release()

    c = leases.acquire_now(p, 100)
    c.settle(0, 0)
    assert tokens.level == 570  # nothing used: the whole reservation back
    c.release()

    d = leases.acquire_now(p, 500)
    assert tokens.level == 70
    d.settle(400, 400)  # used more than reserved: debited, the bucket goes negative
    assert tokens.level == -230
    d.release()
    assert tokens.level == -230
    with pytest.raises(RateLimited) as info:
        leases.acquire_now(p, 1)  # needs 1 token, and the bucket is below 0
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert info.value.headers["retry-after"] == "24"  # 231 tokens at 10 a second, rounded up


def test_an_unsettled_release_refunds_everything():
    leases, _ = manager()
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    tokens = leases.state_for(p).tokens
    keep = leases.acquire_now(p, 100)
    lease = leases.acquire_now(p, 300)
    assert tokens.level == 200
    lease.release()
    assert tokens.level == 500 and lease.reserved == 0 and leases.totals() == (1, 100)
    lease.release()
    assert tokens.level == 500 and leases.totals() == (1, 100)
    keep.release()
    assert tokens.level == 600 and leases.totals() == (0, 0)


def test_no_token_budget_reserves_nothing():
    leases, _ = manager()
    lease = leases.acquire_now(Principal("k", "k", concurrency=0, rpm=10, tpm=0), 500)
    assert lease.reserved == 0 and leases.totals() == (1, 0)
    lease.release()
    assert leases.totals() == (0, 0)


def test_each_key_and_each_set_of_limits_has_its_own_state():
    leases, _ = manager()
    a = Principal("a", "a", concurrency=0, rpm=1, tpm=0)
    b = Principal("b", "b", concurrency=0, rpm=1, tpm=0)
    leases.acquire_now(a, 0).release()
    with pytest.raises(RateLimited):
        leases.acquire_now(a, 0)
    leases.acquire_now(b, 0).release()  # another key's budget is untouched
    a_raised = Principal("a", "a", concurrency=0, rpm=2, tpm=0)
    assert leases.acquire_now(a_raised, 0).headers["x-ratelimit-remaining-requests"] == "1"  # new limits: fresh
    assert leases.state_for(a) is not leases.state_for(b) is not leases.state_for(a_raised)
    assert leases.state_for(a) is leases.state_for(Principal("a", "other name", 0, 1, 0))


def test_acquire_now_without_a_global_cap():
    leases, _ = manager(global_concurrency=0)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    leases_held = [leases.acquire_now(p, 100) for _ in range(3)]
    assert all(lease is not None and not lease.holds_global for lease in leases_held)
    assert [lease.reserved for lease in leases_held] == [100, 100, 100]
    assert leases.global_active == 0 and leases.totals() == (3, 300)
    for lease in leases_held:
        lease.release()
    assert leases.global_active == 0 and leases.totals() == (0, 0)


async def test_acquire_without_a_global_cap_holds_no_slot():
    leases, _ = manager(global_concurrency=0)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=0)
    lease = await leases.acquire(p, 0)
    assert not lease.holds_global and leases.global_active == 0
    lease.release()
    assert leases.global_active == 0


async def test_acquire_counts_every_global_slot():
    leases, _ = manager(global_concurrency=3)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=0)
    first, second = await leases.acquire(p, 0), await leases.acquire(p, 0)
    assert first.holds_global and second.holds_global and leases.global_active == 2
    third = leases.acquire_now(p, 0)
    assert leases.global_active == 3 and leases.acquire_now(p, 0) is None
    for lease in (first, second, third):
        lease.release()
    assert leases.global_active == 0


def test_acquire_now_takes_a_free_global_slot_or_says_to_queue():
    leases, _ = manager(global_concurrency=1)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    lease = leases.acquire_now(p, 100)
    assert lease is not None and lease.holds_global and lease.reserved == 100
    assert leases.global_active == 1 and leases.totals() == (1, 100)
    assert leases.acquire_now(p, 100) is None  # the cap is reached: queue with `acquire`; nothing taken
    assert leases.global_active == 1 and leases.totals() == (1, 100)
    lease.release()
    assert leases.global_active == 0
    again = leases.acquire_now(p, 0)
    assert again is not None and leases.global_active == 1
    again.release()
    assert leases.global_active == 0


async def test_a_released_global_slot_goes_to_the_waiter_not_to_acquire_now():
    leases, _ = manager(global_concurrency=1, queue_size=4, queue_timeout=5)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=0)
    held = leases.acquire_now(p, 0)
    waiter = asyncio.create_task(leases.acquire(p, 0))
    await asyncio.sleep(0)
    held.release()  # handed to the waiter
    assert leases.acquire_now(p, 0) is None
    (await waiter).release()
    assert leases.global_active == 0


def test_acquire_now_rejected_by_the_key_gives_the_global_slot_back():
    leases, _ = manager(global_concurrency=1)
    p = Principal("k", "k", concurrency=0, rpm=1, tpm=0)
    leases.acquire_now(p, 0).release()
    with pytest.raises(RateLimited):
        leases.acquire_now(p, 0)
    assert leases.global_active == 0 and leases.totals() == (0, 0)


def test_acquire_local_costs_a_request_and_a_slot_but_no_tokens_and_no_upstream_slot():
    leases, _ = manager(global_concurrency=1)
    p = Principal("k", "k", concurrency=1, rpm=120, tpm=600)
    lease = leases.acquire_local(p)
    assert not lease.holds_global and lease.reserved == 0
    assert leases.global_active == 0 and leases.totals() == (1, 0)
    assert lease.headers == full_headers(120, 119, "0.500s", 600, 600, "0.000s")
    with pytest.raises(RateLimited) as info:  # the key's one concurrency slot is taken
        leases.acquire_local(p)
    assert info.value.headers == {"retry-after": "1"}
    other = leases.acquire_now(Principal("o", "o", 0, 0, 0), 0)  # the upstream slot is still free
    assert other is not None and leases.global_active == 1
    other.release()
    lease.settle(None, None)
    lease.release()
    assert leases.global_active == 0 and leases.totals() == (0, 0)
    assert leases.state_for(p).tokens.level == 600


def test_acquire_local_respects_the_request_budget():
    leases, _ = manager()
    p = Principal("k", "k", concurrency=0, rpm=1, tpm=0)
    leases.acquire_local(p).release()
    with pytest.raises(RateLimited) as info:
        leases.acquire_local(p)
    assert info.value.type == "requests" and info.value.headers["retry-after"] == "60"


async def test_a_key_in_token_debt_still_gets_its_usage_report():
    """A settle past the reservation leaves the token bucket below zero; a usage report costs no tokens, so it
    is not refused for them (it was: 'this request reserves 0', retry-after 20)."""
    leases, _ = manager()
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=600)
    lease = await leases.acquire(p, 100)
    lease.settle(0, 800)
    lease.release()
    with pytest.raises(RateLimited):
        await leases.acquire(p, 1)  # a request that costs tokens waits for the debt to clear
    leases.acquire_local(p).release()


async def test_full_queue_is_overloaded_at_once():
    leases, _ = manager(global_concurrency=1, queue_size=1, queue_timeout=5)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=0)
    held = await leases.acquire(p, 0)
    waiter = asyncio.create_task(leases.acquire(p, 0))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await leases.acquire(p, 0)
    exc = info.value
    assert (exc.status, exc.type, exc.code) == (503, "server_overloaded", "queue_full")
    assert exc.message == "The server is at capacity and its queue is full; retry shortly."
    assert exc.headers == {"retry-after": "1", "x-sidecar-limit": "queue_full"}
    held.release()
    (await waiter).release()
    assert leases.global_active == 0 and leases.totals() == (0, 0)


async def test_queue_timeout_is_overloaded_with_retry_after():
    leases, _ = manager(global_concurrency=1, queue_size=1, queue_timeout=0.05)
    p = Principal("k", "k", concurrency=0, rpm=0, tpm=0)
    held = await leases.acquire(p, 0)
    with pytest.raises(Overloaded) as info:
        await leases.acquire(p, 0)
    exc = info.value
    assert exc.status == 503 and exc.message == "No capacity within 0.05s; retry shortly."
    assert exc.headers == {"retry-after": "1", "x-sidecar-limit": "queue_timeout"}
    assert leases.global_active == 1 and leases.totals() == (1, 0)
    held.release()
    assert leases.global_active == 0


def families(leases: LocalLimits) -> list[tuple]:
    """The gauges of the leases (the queue's wait histogram is tests/test_fairness_visibility.py's)."""
    return [
        (m.name, m.documentation, m.type, [(s.name, s.labels, s.value) for s in m.samples])
        for m in leases.collect()
        if m.name != "sidecar_queue_wait_seconds"
    ]


def expected(active: int, reserved: int, upstream: int, keys: int | None = None) -> list[tuple]:
    return [
        (
            "sidecar_lease_slots_active",
            "Concurrency slots held by requests, over all keys.",
            "gauge",
            [("sidecar_lease_slots_active", {}, active)],
        ),
        (
            "sidecar_lease_tokens_reserved",
            "Tokens reserved by requests in flight.",
            "gauge",
            [("sidecar_lease_tokens_reserved", {}, reserved)],
        ),
        (
            "sidecar_upstream_slots_active",
            "Requests holding a global upstream slot.",
            "gauge",
            [("sidecar_upstream_slots_active", {}, upstream)],
        ),
        (
            "sidecar_lease_queue_depth",
            "Requests waiting for a global upstream slot, by priority class.",
            "gauge",
            [("sidecar_lease_queue_depth", {"priority": p}, 0) for p in ("high", "normal", "low")],
        ),
        (
            "sidecar_lease_keys",
            "Keys whose limits this replica keeps state for (idle ones are forgotten).",
            "gauge",
            [("sidecar_lease_keys", {}, 2 if keys is None else keys)],
        ),
    ]


def test_collect_reports_slots_reservations_and_upstream_slots():
    leases, _ = manager(global_concurrency=4)
    assert families(leases) == expected(0, 0, 0, keys=0)
    a = leases.acquire_now(Principal("a", "a", 0, 0, 1000), 300)
    b = leases.acquire_now(Principal("b", "b", 0, 10, 1000), 40)
    local = leases.acquire_local(Principal("a", "a", 0, 0, 1000))
    assert families(leases) == expected(3, 340, 2)
    b.settle(10, 10)
    assert families(leases) == expected(3, 300, 2)
    for lease in (a, b, local):
        lease.release()
    assert families(leases) == expected(0, 0, 0)


def test_one_off_keys_are_forgotten_once_idle_with_their_buckets_full():
    """Thousands of keys that each send one request: their state goes once they have been idle for KEY_IDLE
    with nothing in flight and full buckets (made afresh, it is the same), so it does not grow for ever; a
    key still holding a lease, or whose bucket is still refilling, is kept."""
    leases, clock = manager()
    for n in range(2000):
        leases.acquire_now(Principal(f"once-{n}", "k", concurrency=2, rpm=60, tpm=6000), 100).release()
        clock.now += 0.05  # 100 seconds in all
    kept = leases.acquire_now(Principal("busy", "k", concurrency=2, rpm=60, tpm=0), 0)  # in flight throughout
    spent = Principal("spent", "k", concurrency=0, rpm=4, tpm=0)
    for _ in range(4):
        leases.acquire_now(spent, 0).release()  # its request bucket is empty: a minute to refill
    tracked = families(leases)[-1][3][0][2]  # sidecar_lease_keys
    assert tracked <= 2 * KEY_IDLE / 0.05 + 2  # the keys of the last two sweeps' windows, not all 2000
    clock.now += KEY_IDLE  # everyone idle for KEY_IDLE; the spent bucket is half refilled
    leases.acquire_now(Principal("newcomer", "k", 0, 0, 0), 0).release()  # a new key's request sweeps
    assert {k[0] for k in leases._keys} == {"busy", "spent", "newcomer"}
    for _ in range(2):
        leases.acquire_now(spent, 0).release()  # half refilled: 2 of 4
    with pytest.raises(RateLimited):  # what it spent is still counted: forgetting it would have refilled it
        leases.acquire_now(spent, 0)
    clock.now += 60
    kept.release()
    leases.acquire_now(Principal("another", "k", 0, 0, 0), 0).release()
    assert {k[0] for k in leases._keys} == {"another"}
