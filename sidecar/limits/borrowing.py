"""Allowances: this replica's share of balances kept in the store, which every replica sharing it borrows from.

A balance is one row of `limit_balances` (a key, a kind: `budget`, `rpm`, `tpm`, and a bucket naming its
period or capacity). A replica borrows an allowance from it in one statement (at least what a request needs,
else a fraction of what is left, never more), admits requests from the allowance without a store round trip,
tops it up in the background when half is spent (one borrow in flight per balance), takes back what a request
reserved and did not use, and returns the allowance of a balance idle for `IDLE` seconds, and every allowance at
drain. The outstanding allowances are the error bound: what one replica holds, another cannot admit.

What a replica holds of a budget is recorded in the store on a lease (`limit_holders`), renewed every `IDLE / 2`
seconds while it holds a share of that balance: a replica killed without a goodbye stops renewing, and what it
borrowed and did not spend in a stored row goes back to the balance once the lease has expired, at the next
sweep of any replica or the next borrow from that balance (within `LEASE + IDLE / 2` seconds). Per-minute
allowances need no lease: their buckets refill within a minute by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial

from prometheus_client.metrics_core import Metric

from sidecar.errors import StoreUnavailable
from sidecar.ops.series import counter
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.allowances")
FRACTION = 0.125  # a borrow takes an eighth of what is left (at least what the request needs)
IDLE = 5.0  # seconds without a request before an allowance goes back to its balance
LEASE = 10.0  # seconds a replica's holdings (of budgets here, of slots in `slots`) outlive its last renewal
EMPTY_RECHECK = 1.0  # after a balance said "not enough", ask it again at most this often

Borrow = Callable[[float], Awaitable[tuple[float, float]]]  # need -> (granted, left in the balance)


class StoreDown:
    """`limits.store_down` for one shared limit: with the store unreachable, `local` admits by this replica's
    own limits (counted, logged now and then) and `reject` lets the 503 through."""

    def __init__(self, policy: str, what: str) -> None:
        self.local = policy == "local"
        self.what = what
        self.admitted = 0

    def admit_locally(self, error: StoreUnavailable) -> None:
        """Called in `except StoreUnavailable`: returns when the request may go on, else re-raises `error`."""
        if not self.local:
            raise error
        self.admitted += 1
        if self.admitted == 1 or self.admitted % 1000 == 0:
            log.warning(
                f"shared store unreachable: {self.what} enforced per replica (limits.store_down = local)",
                extra={"fields": {"admitted_locally": self.admitted}},
            )


@dataclass(frozen=True, slots=True)
class Balance:
    """Which balance: a key's, of one kind, in one bucket; `cap` bounds a refilling one (None: no bound)."""

    key_id: str
    kind: str
    bucket: str
    cap: float | None = None


@dataclass(slots=True)
class Share:
    """This replica's allowance of one balance."""

    allowance: float = 0.0  # borrowed, not yet reserved (negative: used beyond what was reserved)
    reserved: float = 0.0  # held by requests in flight
    low: float = 0.0  # below this the allowance is topped up in the background
    last_used: float = 0.0
    empty_until: float = 0.0
    until: float = float("inf")  # the balance's period ends: then it goes back at once
    left: float = 0.0  # what the balance held after this replica's last borrow ...
    left_at: float = 0.0  # ... and when (the pool's clock): for the cluster-wide remaining figure
    borrowing: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Hold:
    share: Share
    reserved: float
    settled: bool = False

    def settle(self, used: float) -> None:
        """Replace the reservation by what the request used (once): the difference goes back to (or, when it
        used more, comes out of) the allowance, and reaches the store when the allowance is returned."""
        if self.settled:
            return
        self.settled = True
        self.share.reserved -= self.reserved
        self.share.allowance += self.reserved - used
        self.reserved = 0


class Borrower:
    def __init__(self, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        self._shares: dict[Balance, Share] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # set by `close`: the sweep stops between rounds, never inside a statement
        self._refills: set[asyncio.Future[None]] = set()
        self.borrows = 0  # statements sent to borrow (the benchmark's and the tests' figure)

    async def take(self, balance: Balance, need: float, borrow: Borrow, until: float = float("inf")) -> Hold | None:
        """Hold `need` of the balance for a request; None when the balance cannot give it."""
        now = self.clock()
        share = self._shares.get(balance)
        if share is None:
            share = self._shares[balance] = Share(until=until)
        share.last_used = now
        if share.allowance < need:
            if now < share.empty_until:
                return None  # it said "not enough" a moment ago (only an answer moves this, not each refusal)
            await self._borrow(share, need - share.allowance, borrow)
            if share.allowance < need:
                share.empty_until = now + EMPTY_RECHECK
                return None
        share.allowance -= need
        share.reserved += need
        if share.allowance < share.low and share.borrowing is None:  # top up before it runs out
            task = asyncio.ensure_future(self._borrow_quietly(share, borrow))
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)
        return Hold(share, need)

    async def _borrow(self, share: Share, need: float, borrow: Borrow) -> None:
        """One borrow in flight per balance: a request that finds one running waits for it."""
        if share.borrowing is not None:
            await asyncio.shield(share.borrowing)
            if share.allowance >= need or self.clock() < share.empty_until:
                return
        share.borrowing = done = asyncio.get_running_loop().create_future()
        try:
            self.borrows += 1
            granted, share.left = await borrow(max(need, 0.0))
            share.left_at = self.clock()
            share.allowance += granted
            share.low = granted / 2
        except StoreError:
            raise StoreUnavailable("A shared limit cannot be checked: the store is unavailable.") from None
        finally:
            share.borrowing = None
            done.set_result(None)

    def share(self, balance: Balance) -> Share | None:
        return self._shares.get(balance)

    async def _borrow_quietly(self, share: Share, borrow: Borrow) -> None:
        with contextlib.suppress(StoreUnavailable):  # a request that needs it will ask again, and say so
            await self._borrow(share, 0.0, borrow)

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_limit_borrows",
            "Statements that borrowed an allowance from a shared balance (budgets; rpm and tpm with PostgreSQL).",
            (),
            {(): self.borrows},
        )

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def close(self) -> None:
        """At drain: every allowance goes back, so other replicas can use it."""
        if self._sweeper is not None:
            # Not a cancel: one landing inside a store statement can be swallowed on its way out (psycopg
            # cancels the query server-side), leaving a sweep that never ends and a drain that waits for it.
            self._closing.set()
            await self._sweeper
        if self._refills:
            await asyncio.wait(self._refills)
        await self._give_back(lambda share: True)

    async def _sweep_forever(self) -> None:
        failing = False
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), IDLE / 2)
                return
            now = self.clock()
            try:
                await self._give_back(partial(_due, now=now))
                held = [(b.key_id, b.bucket) for b in self._shares if b.kind == "budget"]
                await self.store.tend_holdings(held, LEASE)
                failing = False
            except StoreError as exc:
                if not failing:  # once per outage: the sweep runs every few seconds
                    log.warning("allowances not returned or renewed yet", extra={"fields": {"error": str(exc)[:200]}})
                failing = True

    async def _give_back(self, due: Callable[[Share], bool]) -> None:
        """Return the allowances of idle balances and ended periods (those with nothing in flight). Each share is
        dropped before its allowance goes back: a request arriving meanwhile starts a new share (and borrows)
        instead of spending, uncharged, from one on its way back."""
        for balance, share in list(self._shares.items()):
            if self._shares.get(balance) is not share:
                continue  # returned, or replaced, while an earlier give-back ran
            if share.reserved or share.borrowing is not None or not due(share):
                continue
            del self._shares[balance]
            if not share.allowance:
                continue
            lease = LEASE if balance.kind == "budget" else None  # a budget's is held on a lease
            try:
                await self.store.give_back(
                    balance.key_id, balance.kind, balance.bucket, share.allowance, balance.cap, lease
                )
            except StoreError:
                self._keep(balance, share)
                raise

    def _keep(self, balance: Balance, share: Share) -> None:
        """A give-back that failed: the allowance is still this replica's in the store, to use or return later
        (into the share a request started meanwhile, if one did)."""
        current = self._shares.get(balance)
        if current is None:
            self._shares[balance] = share
        else:
            current.allowance += share.allowance


def _due(share: Share, now: float) -> bool:
    return share.until <= now or now - share.last_used >= IDLE
