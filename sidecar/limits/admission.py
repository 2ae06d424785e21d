"""Admission: the one place that decides whether a request may go to the upstream, and what it holds while it runs.

`Limits.reserve(call)` says what a request reserves (its prompt estimate plus its output budget); `admit`
takes, in this order, each able to refuse with a 429 (or a 503 when the store is down and the limit fails
closed):

1. the key's concurrency slot for the whole deployment (`slots`, replicas sharing PostgreSQL, or the workers of
   one pod sharing its SQLite store);
2. the key's token budget for its period (`budgets`, through the allowances `borrowing` keeps);
3. its requests and tokens per minute for the whole deployment (`rates`, shared as the slots are);
4. this replica's own lease (`local`): the key's concurrency and per-minute buckets, then the global cap on
   upstream requests, queued for when `limits.global_concurrency` is reached.

A refusal (or a cancel while queued) gives back what was taken, in reverse order, as if nothing was used. A
wait in the queue may be watched by the caller (`admit`'s `keepalive`: a queued stream's SSE comments); when
the watch ends early (the client left) the wait is cancelled and its place goes at once. The
`Lease` an admitted request holds settles every part to the real usage once (`settle`) and lets go of them
once (`release`), local lease first, shared slot last.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric

from sidecar.config import LimitsCfg
from sidecar.errors import RateLimited
from sidecar.keys.auth import Principal
from sidecar.limits.borrowing import Borrower, Hold
from sidecar.limits.budgets import Budgets
from sidecar.limits.gauges import BudgetGauges
from sidecar.limits.local import LocalLease, LocalLimits
from sidecar.limits.rates import SharedRates
from sidecar.limits.saturation import Fetch, Saturation
from sidecar.limits.slots import SharedSlots, SlotHold
from sidecar.store.base import Store
from sidecar.wire.body import Call
from sidecar.wire.routes import NO_OUTPUT
from sidecar.wire.tokens import estimate_prompt

# Watches a wait in the dispatch queue (`Limits.admit`): returns when the wait is done, raises when the client left.
Keepalive = Callable[[asyncio.Future[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request reserves before it goes: its prompt estimate and its output budget (for all its
    answers), in tokens; `cap`: the output cap to write into a request that named none (else None)."""

    prompt: int
    output: int
    cap: int | None = None

    @property
    def total(self) -> int:
        return self.prompt + self.output


class Lease:
    """What one admitted request holds: its local lease, its shared allowances (budget, tokens per minute) and
    its shared concurrency slot. `settle` and `release` each act once."""

    __slots__ = ("holds", "local", "slot")

    def __init__(self, local: LocalLease, holds: tuple[Hold, ...] = (), slot: SlotHold | None = None) -> None:
        self.local = local
        self.holds = holds
        self.slot = slot

    @property
    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers the answer carries."""
        return self.local.headers

    def settle(self, prompt: int | None, completion: int | None) -> None:
        """Reconcile every reservation to what the request really used (once; later calls are no-ops)."""
        if self.local.settled:
            return
        used = (prompt or 0) + (completion or 0)
        for hold in self.holds:
            hold.settle(used)
        self.local.settle(prompt, completion)

    def release(self) -> None:
        if self.local.released:
            return
        self.settle(0, 0)  # a no-op when settled; else nothing known to have been used: refund
        self.local.release()
        if self.slot is not None:
            self.slot.release()


async def _watched(waiting: Coroutine[Any, Any, LocalLease], keepalive: Keepalive) -> LocalLease:
    """`waiting` (a wait in the queue) while `keepalive` watches it. When the watch ends first (its comment could
    not be written, or the handler was cancelled: the client left) the wait is cancelled, which takes it out of
    the queue at once; a slot handed over in that same moment goes back (on to the next waiter)."""
    task = asyncio.ensure_future(waiting)
    try:
        await keepalive(task)
    except (Exception, asyncio.CancelledError):  # the watch ended first: the wait must not outlive it
        task.cancel()
        await asyncio.wait((task,))
        if not task.cancelled() and task.exception() is None:
            task.result().release()
        raise
    return task.result()


class Limits:
    """Admission for the proxy and the routes that cost a request (a key's own reports and figures: `report`),
    and the figures the reports show (a budget's remaining tokens)."""

    def __init__(
        self, cfg: LimitsCfg, store: Store, engine_page: Fetch | None = None, shared: bool | None = None
    ) -> None:
        """`shared`: the key's minute limits and concurrency are held in the store for every process sharing it
        (default: with PostgreSQL, replicas share it; `server.workers > 1` shares a SQLite one too)."""
        self.cfg = cfg
        self.local = LocalLimits(cfg)
        # The dispatch limit from the engine's page; started with the upstream pool (the app's lifecycle).
        self.saturation = Saturation(cfg, self.local, engine_page)
        self.borrower = Borrower(store)
        self.budgets = Budgets(cfg.timezone, self.borrower)
        self.gauges = BudgetGauges(self.budgets, cfg.budget_metrics_refresh)  # refreshed before a scrape
        if shared is None:
            shared = store.kind == "postgres"  # replicas share it: limits hold for all of them together
        # None with one process alone on its SQLite store: its local buckets and slots are the whole truth.
        self.rates = SharedRates(self.borrower, cfg.store_down) if shared else None
        self.slots = SharedSlots(store, cfg.store_down) if shared else None
        self._reporting: set[str | None] = set()  # keys with a report running: one at a time per key

    def needs_context(self, call: Call) -> bool:
        """Whether `call`'s reservation needs the model's context length (`reserve`'s `context`): it can generate
        output, names no cap for it, and no cap is enforced."""
        uncapped = call.doc is not None and call.max_tokens is None and call.family not in NO_OUTPUT
        return uncapped and not self.cfg.enforce_max_tokens

    def reserve(self, call: Call, context: int | None = None) -> Reservation:
        """What `call` reserves (README, "What a client can make it cost"):
        - a body the sidecar reads: its prompt estimate, plus its output budget times the answers it asks for
          (`n`, `best_of`, a batch's prompts). The budget is `max_tokens` when named; else, with
          `limits.enforce_max_tokens`, `limits.default_max_tokens` written into the forwarded body; else what
          the model can produce (its `context` length less the prompt, a whole context per answer when there
          are several) when the upstream lists it, else `limits.default_max_tokens`. Nothing for a route with
          no output.
        - a body it cannot read (an upload, a route of no known family): `limits.default_max_tokens`, settled
          to the upstream's usage when it reports one (else charged as reserved); a bodiless request
          (GET /v1/models, /health): nothing, it costs no tokens."""
        cfg = self.cfg
        if call.doc is None:
            return Reservation(0, cfg.default_max_tokens if call.body and call.family not in NO_OUTPUT else 0)
        prompt = estimate_prompt(call.doc, cfg.media_tokens)
        if call.family in NO_OUTPUT:
            return Reservation(prompt, 0)
        if call.max_tokens is not None:
            return Reservation(prompt, call.max_tokens * call.answers)
        if cfg.enforce_max_tokens:
            return Reservation(prompt, cfg.default_max_tokens * call.answers, cfg.default_max_tokens)
        if context is None:
            return Reservation(prompt, cfg.default_max_tokens * call.answers)
        if call.answers == 1:
            return Reservation(prompt, max(context - prompt, 0))
        return Reservation(prompt, context * call.answers)

    async def admit(
        self,
        principal: Principal,
        reservation: Reservation,
        queued: Callable[[float], None],
        keepalive: Keepalive | None = None,
    ) -> Lease:
        """Everything the request must hold, in the order of this module's docstring, or `RateLimited` (or
        `StoreUnavailable`) with nothing held. A wait for a global slot is reported to `queued` (milliseconds,
        refused or not): that time is the queue's, not the sidecar's own; `keepalive`, when given, watches that
        wait (and only it: a request that need not queue never meets it)."""
        need = reservation.total
        slot = None
        if self.slots is not None and principal.concurrency and principal.key_id is not None:
            slot = await self.slots.take(principal.key_id, principal.concurrency)
        holds: list[Hold] = []
        admitted = False
        try:
            if principal.budget_tokens is not None or self.rates is not None:  # else nothing to hold: no await
                await self._shared_holds(principal, need, holds)
            local = self.local.acquire_now(principal, need)
            if local is None:
                local = await self._queue(principal, need, queued, keepalive)
            admitted = True
        except RateLimited as exc:
            if self.rates is not None:  # the figures for the whole deployment, not this replica's
                self.rates.headers(principal, exc.headers)
            raise
        finally:
            if not admitted:  # refused (or cancelled while queued) after something was taken: nothing was used
                for hold in reversed(holds):
                    hold.settle(0)
                if slot is not None:
                    slot.release()
        if self.rates is not None:
            self.rates.headers(principal, local.headers)
        return Lease(local, tuple(holds), slot)

    def admit_local(self, principal: Principal) -> Lease:
        """A request of the key's that costs no tokens and no upstream slot (a usage report): one request of its
        per-minute budget and a concurrency slot while it runs. Raises `RateLimited` beyond them."""
        return Lease(self.local.acquire_local(principal))

    @contextlib.contextmanager
    def report(self, principal: Principal) -> Iterator[None]:
        """What a report or figure a key asks for (its usage, its budget left, its series) holds while it runs:
        the key's one report at a time, a request of its per-minute budget and a concurrency slot (`RateLimited`
        beyond any of them). A report costs the store more than a request costs the proxy."""
        kid = principal.key_id
        if kid is not None and kid in self._reporting:
            raise RateLimited("One report at a time per key.", headers={"retry-after": "1"})
        lease = self.admit_local(principal)
        if kid is not None:
            self._reporting.add(kid)
        try:
            yield
        finally:
            self._reporting.discard(kid)
            lease.release()

    def remaining(self, key_id: str, budget: int, period: str) -> Awaitable[tuple[int, float]]:
        """A budget's tokens left (the budget less what the stored rows used, as the store keeps it: on the report
        connection) and when it resets."""
        return self.budgets.remaining(key_id, budget, period)

    async def _shared_holds(self, principal: Principal, need: int, holds: list[Hold]) -> None:
        """The key's budget, then (replicas sharing PostgreSQL) its minute limits for the whole deployment, into
        `holds` as each is taken (the caller gives them back when admission fails)."""
        kid, budget, period = principal.key_id, principal.budget_tokens, principal.budget_period
        if kid is not None and budget is not None and period:
            holds.append(await self.budgets.reserve(kid, budget, period, need))
        if self.rates is not None and (tokens := await self.rates.take(principal, need)) is not None:
            holds.append(tokens)

    def headers(self, principal: Principal) -> dict[str, str]:
        """The key's `x-ratelimit-*` figures as they stand, before its lease is taken: for an answer that starts
        while the request waits in the queue (a kept-alive stream)."""
        headers = self.local.headers(principal)
        if self.rates is not None:
            self.rates.headers(principal, headers)
        return headers

    async def _queue(
        self, principal: Principal, need: int, queued: Callable[[float], None], keepalive: Keepalive | None
    ) -> LocalLease:
        began = time.monotonic()
        try:
            waiting = self.local.acquire(principal, need)
            return await (waiting if keepalive is None else _watched(waiting, keepalive))
        finally:
            queued((time.monotonic() - began) * 1000.0)

    def collectors(self) -> list[Callable[[], Iterator[Metric]]]:
        shared = [self.slots.collect, self.rates.collect] if self.slots is not None and self.rates else []
        return [self.local.collect, self.saturation.collect, self.borrower.collect, self.gauges.collect, *shared]

    async def start(self) -> None:
        await self.borrower.start()
        if self.slots is not None:
            await self.slots.start()

    async def close(self) -> None:
        """Allowances and slots go back to the store (at drain: the writer's last flush comes after)."""
        await self.gauges.close()
        try:
            if self.slots is not None:
                await self.slots.close()  # raises when the store is unreachable: the borrower still closes
        finally:
            await self.borrower.close()
