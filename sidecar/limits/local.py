"""Local limits: this replica's per-key concurrency and requests/tokens per minute, and the global cap on upstream
requests (with its bounded queue).

Budgets are token buckets on a monotonic clock (capacity = the per-minute limit, refilled continuously). A
request reserves one request and `prompt estimate + output budget` tokens (capped at the bucket's capacity, so
a large request can still run when the bucket is full); `LocalLease.settle(prompt, completion)` reconciles the
reservation to real usage (refund or debit: the bucket may go negative and later requests wait for it).
`release()` is idempotent and unsettled leases are refunded in full. A rejected request holds nothing and
changes no counter: every check happens before anything is taken. A key's state is forgotten once it has
been idle for `KEY_IDLE` seconds with nothing in flight and its buckets full again (made afresh, it would be
the same): one-off keys do not pile up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from sidecar.config import LimitsCfg
from sidecar.errors import Overloaded, RateLimited
from sidecar.keys.auth import Principal
from sidecar.limits.queue import PRIORITIES, DispatchQueue, Ticket
from sidecar.limits.served import ServedWindow
from sidecar.ops.series import Hist, gauge, histograms

_SHED = "The server is at capacity and gave this request's place to one of a higher priority; retry shortly."


def _refused(code: str, message: str) -> Overloaded:
    """A 503 of the dispatch queue that says which of its limits refused (its `code`, and the `x-sidecar-limit`
    header): a client can tell a full queue from a wait that ran out or a place given to a higher class."""
    err = Overloaded(message, headers={"retry-after": "1", "x-sidecar-limit": code})
    err.code = err.reason = code  # counted by which limit too (sidecar_rate_limited_total{reason})
    return err


RANKS = {name: rank for rank, name in enumerate(PRIORITIES)}
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
KEY_IDLE = 30.0  # seconds a key's state is kept after its last request (swept at most this often)


class Bucket:
    __slots__ = ("capacity", "level", "limit_text", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.limit_text = str(per_minute)  # the x-ratelimit-limit-* value, on every response
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, need: float) -> float:
        """Seconds until `need` is available (0 when it is now)."""
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def reset_in(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(slots=True)
class KeyState:
    concurrency: int
    requests: Bucket | None
    tokens: Bucket | None
    active: int = 0
    reserved: int = 0  # tokens reserved by this key's unsettled leases
    last_used: float = 0.0

    def idle(self, now: float) -> bool:
        """Nothing in flight, no request for `KEY_IDLE` seconds and its buckets full: a fresh state is the same."""
        if self.active or self.reserved or now - self.last_used < KEY_IDLE:
            return False
        return all(b is None or _refilled(b, now) for b in (self.requests, self.tokens))


def _refilled(bucket: Bucket, now: float) -> bool:
    bucket.refill(now)
    return bucket.level >= bucket.capacity


@dataclass(slots=True)
class LocalLease:
    manager: LocalLimits
    state: KeyState
    reserved: int
    holds_global: bool
    headers: dict[str, str] = field(default_factory=dict)
    share: tuple[str, float, int] | None = None  # (key, weight, tokens charged) in the dispatch queue's counters
    settled: bool = False
    released: bool = False

    def settle(self, prompt: int | None, completion: int | None) -> None:
        """Reconcile the token reservation to what the request really used (once; later calls are no-ops)."""
        if self.settled:
            return
        self.settled = True
        used = (prompt or 0) + (completion or 0)
        if self.share is not None:
            key, weight, charged = self.share
            self.manager.queue.charge(key, weight, used - charged)  # the reservation becomes the real usage
            if used:
                self.manager.served.add(key, used, self.manager.clock())
        state = self.state
        state.reserved -= self.reserved
        if state.tokens is not None:
            state.tokens.refill(self.manager.clock())
            bucket = state.tokens
            bucket.level = min(bucket.capacity, bucket.level + self.reserved - used)  # a refund never overfills
        self.reserved = 0

    def release(self) -> None:
        if self.released:
            return
        if not self.settled:
            self.settle(0, 0)  # nothing known to have been used: refund the reservation
        self.released = True
        self.state.active -= 1
        if self.share is not None:
            self.manager.queue.done(self.share[0])
        if self.holds_global:
            self.manager.release_global()


class LocalLimits:
    def __init__(self, cfg: LimitsCfg, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._keys: dict[tuple[str | None, int, int, int], KeyState] = {}
        self._pruned_at = clock()
        self.global_active = 0
        self.limit = cfg.global_concurrency  # requests dispatched at once (the engine's saturation may lower it)
        self.queue = DispatchQueue(cfg.queue_size, cfg.queue_order == "fair")
        self.served = ServedWindow()  # tokens per key lately: the console's shares
        self.waits = [Hist(QUEUE_WAIT_BUCKETS) for _ in PRIORITIES]  # time to a global slot, per class

    def state_for(self, p: Principal) -> KeyState:
        # Keyed by limits too: changing a key's limits starts a fresh state instead of a confusing mix.
        k = (p.key_id, p.concurrency, p.rpm, p.tpm)
        state = self._keys.get(k)
        if state is None:
            now = self.clock()
            self._prune(now)
            state = self._keys[k] = KeyState(
                p.concurrency, Bucket(p.rpm, now) if p.rpm else None, Bucket(p.tpm, now) if p.tpm else None
            )
        return state

    def _prune(self, now: float) -> None:
        """Forget idle keys (`KeyState.idle`); when a new key comes, at most every `KEY_IDLE` seconds (a sweep
        over every key's state)."""
        if now - self._pruned_at < KEY_IDLE:
            return
        self._pruned_at = now
        for k in [k for k, state in self._keys.items() if state.idle(now)]:
            del self._keys[k]

    def acquire_now(self, principal: Principal, estimate: int) -> LocalLease | None:
        """A lease without waiting, or None when the request must queue for a global slot (then `acquire`).

        Raises `RateLimited` like `acquire` when the key's limits say no.
        """
        if not self.limit:
            return self._admit(principal, estimate, False)
        if self.global_active >= self.limit or len(self.queue):
            return None
        self.global_active += 1
        self.waits[RANKS.get(principal.priority, 1)].counts[0] += 1  # no wait: the first bucket, the sum as is
        lease = self._admit_holding(principal, estimate, True)
        self._dispatched(lease, principal, estimate)
        return lease

    def acquire_local(self, principal: Principal) -> LocalLease:
        """A request of the key's that costs no tokens and no upstream slot (a usage report): one request of
        its per-minute budget and a concurrency slot while it runs. Raises `RateLimited` beyond them."""
        return self._admit(principal, 0, False)

    async def acquire(self, principal: Principal, estimate: int) -> LocalLease:
        holds = await self._acquire_global(principal, estimate)
        try:
            lease = self._admit_holding(principal, estimate, holds)
        except RateLimited:
            if holds:  # dispatched (and charged), then refused by the key's own limits: undo the charge
                self.queue.charge(principal.key_id or "", principal.weight, -estimate)
                self.queue.done(principal.key_id or "")
            raise
        if holds:
            lease.share = (principal.key_id or "", principal.weight, estimate)
        return lease

    def _dispatched(self, lease: LocalLease, p: Principal, estimate: int) -> None:
        """A lease that goes upstream without waiting: its reservation counts as its key's service, corrected
        to the real usage when it settles (one that waited was charged when the queue chose it)."""
        key = p.key_id or ""
        self.queue.dispatched(key, p.weight, estimate)
        lease.share = (key, p.weight, estimate)

    def _admit_holding(self, principal: Principal, estimate: int, holds_global: bool) -> LocalLease:
        admitted = False
        try:
            lease = self._admit(principal, estimate, holds_global)
            admitted = True
            return lease
        finally:
            if holds_global and not admitted:  # rejected by the key's limits: the global slot goes back
                self.release_global()

    def _admit(self, p: Principal, estimate: int, holds_global: bool) -> LocalLease:
        state = self.state_for(p)
        now = self.clock()
        req, tok = state.requests, state.tokens
        if state.concurrency and state.active >= state.concurrency:
            raise RateLimited(
                f"Too many concurrent requests for this key (limit {state.concurrency}).",
                headers={"retry-after": "1"},
                type_="requests",
                reason="concurrency",
            )
        if req is not None:
            req.refill(now)
            if req.level < 1:
                raise RateLimited(
                    f"Rate limit reached: {p.rpm} requests per minute.",
                    type_="requests",
                    headers=self._limit_headers(state, retry=req.wait_for(1)),
                )
        need = 0
        if tok is not None:
            tok.refill(now)
            need = min(estimate, int(tok.capacity))
            if need > 0 and tok.level < need:  # a request that costs no tokens is not refused for them
                raise RateLimited(
                    f"Rate limit reached: {p.tpm} tokens per minute; this request reserves {need}.",
                    type_="tokens",
                    headers=self._limit_headers(state, retry=tok.wait_for(need)),
                )
        # Every check passed: take.
        state.last_used = now
        state.active += 1
        if req is not None:
            req.level -= 1
        if tok is not None:
            tok.level -= need
        state.reserved += need
        return LocalLease(self, state, need, holds_global, self._limit_headers(state))

    def headers(self, p: Principal) -> dict[str, str]:
        """The key's `x-ratelimit-*` figures as they stand (nothing taken)."""
        return self._limit_headers(self.state_for(p))

    @staticmethod
    def _limit_headers(state: KeyState, retry: float | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if retry is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry)))
        req, tok = state.requests, state.tokens
        if req is not None:
            headers["x-ratelimit-limit-requests"] = req.limit_text
            headers["x-ratelimit-remaining-requests"] = str(max(0, int(req.level)))
            headers["x-ratelimit-reset-requests"] = f"{req.reset_in():.3f}s"
        if tok is not None:
            headers["x-ratelimit-limit-tokens"] = tok.limit_text
            headers["x-ratelimit-remaining-tokens"] = str(max(0, int(tok.level)))
            headers["x-ratelimit-reset-tokens"] = f"{tok.reset_in():.3f}s"
        return headers

    async def _acquire_global(self, p: Principal, estimate: int) -> bool:
        """A global upstream slot: at once when one is free and nobody waits, else a place in the dispatch queue
        until `release_global` hands one over (or the queue's timeout, a full queue, or a higher class's request
        pushing this one out: each a 503 that says which, with `retry-after`)."""
        if not self.limit:
            return False
        rank = RANKS.get(p.priority, 1)
        if self.global_active < self.limit and not len(self.queue):
            self.global_active += 1
            self.queue.dispatched(p.key_id or "", p.weight, estimate)
            self.waits[rank].counts[0] += 1  # no wait: the first bucket, the sum as is
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket, shed = self.queue.push(p.key_id or "", p.weight, rank, estimate, fut)
        if ticket is None:
            raise _refused("queue_full", "The server is at capacity and its queue is full; retry shortly.")
        if shed is not None:
            shed.handle.set_exception(_refused("queue_shed", _SHED))
        began = self.clock()
        try:
            async with asyncio.timeout(self.cfg.queue_timeout):
                await fut
        except TimeoutError:
            self._leave(ticket)
            raise _refused("queue_timeout", f"No capacity within {self.cfg.queue_timeout:g}s; retry shortly.") from None
        except asyncio.CancelledError:
            self._leave(ticket)
            raise
        finally:  # dispatched, timed out, shed or gone: each waited this long in its class
            self.waits[rank].observe(self.clock() - began)
        return True  # the releaser handed its slot over: global_active already counts us

    def _leave(self, ticket: Ticket) -> None:
        """A waiter that stops waiting: out of the queue; or, when it was handed a slot at the same moment
        (chosen and charged), the charge is undone and the slot goes on."""
        if self.queue.remove(ticket):
            return
        fut = ticket.handle
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.queue.charge(ticket.key, ticket.weight, -ticket.cost)
            self.queue.done(ticket.key)
            self.release_global()

    def set_limit(self, limit: int) -> None:
        """Requests dispatched at once from now on (the engine's saturation moves it; 0 or less is taken as 1):
        a higher limit hands the new slots to waiters at once, a lower one lets running requests finish."""
        self.limit = max(1, limit)
        while self.global_active < self.limit and len(self.queue):
            self.global_active += 1
            self.release_global()  # hands the slot to the next waiter (or gives it back when all had left)

    def release_global(self) -> None:
        """A slot comes free: handed to the next waiter in the queue's order, else given back; given back too
        while more are in flight than a lowered limit allows (the waiters wait until fewer are)."""
        while self.global_active <= self.limit and (ticket := self.queue.pop()) is not None:
            fut = ticket.handle
            if not fut.done():
                fut.set_result(None)  # hand the slot over; global_active stays the same
                return
            self.queue.charge(ticket.key, ticket.weight, -ticket.cost)  # it left already: nothing served
            self.queue.done(ticket.key)
        self.global_active -= 1

    def queue_view(self, top: int) -> dict[str, Any]:
        """The dispatch queue as an operator sees it (the console): depth per class, and per key (at most `top`,
        the busiest first) what waits, what runs and its share of the tokens served over the last minutes."""
        served = self.served.totals(self.clock())
        total = sum(served.values())
        now = self.queue.per_key()
        idle = ([0] * len(PRIORITIES), 0)
        keys = sorted(
            now.keys() | served.keys(),
            key=lambda k: (-sum(now.get(k, idle)[0]), -now.get(k, idle)[1], -served.get(k, 0), k),
        )
        rows = [
            {
                "key_id": key or None,  # "" is the requests of no key (auth off)
                "waiting": dict(zip(PRIORITIES, now.get(key, idle)[0], strict=True)),
                "in_flight": now.get(key, idle)[1],
                "served_tokens": served.get(key, 0),
                "share": round(served.get(key, 0) / total, 4) if total else 0.0,
            }
            for key in keys[:top]
        ]
        return {
            "object": "queue",
            "order": self.cfg.queue_order,
            "limit": self.limit,
            "active": self.global_active,
            "size": self.cfg.queue_size,
            "depth": {name: self.queue.depth(rank) for rank, name in enumerate(PRIORITIES)},
            "window_seconds": self.served.span,
            "served_tokens": total,
            "keys": len(keys),
            "data": rows,
        }

    def totals(self) -> tuple[int, int]:
        """(active leases, reserved tokens) over all keys: zero when nothing is in flight."""
        return sum(s.active for s in self._keys.values()), sum(s.reserved for s in self._keys.values())

    def collect(self) -> Iterator[Metric]:
        active, reserved = self.totals()
        yield gauge(
            "sidecar_lease_slots_active", "Concurrency slots held by requests, over all keys.", (), {(): active}
        )
        yield gauge("sidecar_lease_tokens_reserved", "Tokens reserved by requests in flight.", (), {(): reserved})
        yield gauge(
            "sidecar_upstream_slots_active", "Requests holding a global upstream slot.", (), {(): self.global_active}
        )
        yield gauge(
            "sidecar_lease_queue_depth", "Requests waiting for a global upstream slot, by priority class.",
            ("priority",), {(name,): self.queue.depth(rank) for rank, name in enumerate(PRIORITIES)},
        )  # fmt: skip
        yield histograms(
            "sidecar_queue_wait_seconds",
            "Time from arrival to a global upstream slot (0 when one was free), by the key's priority class; a "
            "request refused or gone while queued counts the time it waited.",
            ("priority",), {(name,): self.waits[rank] for rank, name in enumerate(PRIORITIES)},
        )  # fmt: skip
        yield gauge(
            "sidecar_lease_keys", "Keys whose limits this replica keeps state for (idle ones are forgotten).", (),
            {(): len(self._keys)},
        )  # fmt: skip
