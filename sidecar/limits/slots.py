"""Slots: a key's concurrency held for the whole deployment, when replicas share a PostgreSQL store.

Each replica holds some of a key's slots in the store (`limit_slots`, one row per key and replica) on a lease
it renews every `LEASE / 3` seconds; every replica counts the others' unexpired holdings before it takes more.
A request uses a slot this replica holds; when none is free it asks the store for one more (one statement),
and a freed slot stays held for the next request until the key has been idle for `IDLE` seconds. A replica
killed without a goodbye stops renewing: its slots expire within `LEASE` seconds and the others can take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from prometheus_client.metrics_core import Metric

from sidecar.errors import RateLimited, StoreUnavailable
from sidecar.limits.borrowing import IDLE, LEASE, StoreDown
from sidecar.ops.series import counter
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.slots")


@dataclass(slots=True)
class KeySlots:
    held: int = 0  # slots this replica holds in the store for the key
    active: int = 0  # of those, in use by requests
    waiting: int = 0  # requests waiting for one: a question to the store asks for all of them at once
    last_used: float = 0.0
    asking: asyncio.Future[None] | None = None
    unsure: bool = False  # a question to the store failed: it may have been answered there (then lost on the way)


@dataclass(slots=True)
class SlotHold:
    slots: KeySlots
    clock: Callable[[], float]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots.active -= 1
            self.slots.last_used = self.clock()


class SharedSlots:
    def __init__(self, store: Store, store_down: str = "local", clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.store_down = StoreDown(store_down, "concurrency")
        self.clock = clock
        self.replica = uuid.uuid4().hex[:16]  # this process, in `limit_slots`
        self._keys: dict[tuple[str, int], KeySlots] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # set by `close`: the renewal stops between rounds
        self.asks = 0  # statements that asked the store for a slot

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_limit_slot_asks",
            "Statements that asked the shared store for a concurrency slot.",
            (),
            {(): self.asks},
        )
        yield counter(
            "sidecar_limit_local_admissions",
            "Requests admitted by this replica's own limits while the shared store was unreachable.",
            ("limit",),
            {("concurrency",): self.store_down.admitted},
        )

    async def take(self, key_id: str, limit: int) -> SlotHold | None:
        """A slot of the key's `limit` for a request, or RateLimited (every slot is in use somewhere). With the
        store unreachable and `store_down = local`: None (only this replica's own limit applies)."""
        try:
            return await self._take(key_id, limit)
        except StoreUnavailable as exc:
            self.store_down.admit_locally(exc)  # or re-raised: the 503
            return None

    async def _take(self, key_id: str, limit: int) -> SlotHold:
        slots = self._keys.setdefault((key_id, limit), KeySlots())
        slots.last_used = self.clock()
        slots.waiting += 1
        try:
            while slots.active >= slots.held:
                if slots.asking is not None:  # one question to the store at a time per key
                    await asyncio.shield(slots.asking)
                    continue
                before = slots.held
                await self._ask(key_id, limit, slots)
                if slots.held <= before and slots.active >= slots.held:
                    raise RateLimited(
                        f"Too many concurrent requests for this key (limit {limit}, across all replicas).",
                        headers={"retry-after": "1"},
                        type_="requests",
                        reason="concurrency",
                    )
        finally:
            slots.waiting -= 1
        slots.active += 1
        return SlotHold(slots, self.clock)

    async def _ask(self, key_id: str, limit: int, slots: KeySlots) -> None:
        slots.asking = done = asyncio.get_running_loop().create_future()
        self.asks += 1
        try:
            # For every request waiting, not one: a burst of a thousand streams is one question, not a thousand
            # in a row (a question is a write transaction: SQLite runs one at a time for all workers).
            want = slots.active + slots.waiting - slots.held
            slots.held = await self.store.borrow_slots(key_id, self.replica, limit, want, LEASE)
            slots.unsure = False  # the store's answer is the row as it is now
        except StoreError:
            slots.unsure = True  # it may have been done there, the answer lost: the next return sets our count
            raise StoreUnavailable("The key's concurrency cannot be checked: the store is unavailable.") from None
        except asyncio.CancelledError:
            slots.unsure = True  # the asker's client left; the store may still grant it (SQLite finishes it)
            raise
        finally:
            slots.asking = None
            done.set_result(None)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tend())

    async def close(self) -> None:
        """At drain: every slot goes back."""
        if self._task is not None:
            self._closing.set()  # not a cancel: one landing inside a store statement can be swallowed there
            await self._task
        await self._return(lambda slots: True)

    async def _tend(self) -> None:
        """Renew this replica's lease, and give back the spare slots of idle keys."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), LEASE / 3)
                return
            now = self.clock()
            try:
                await self.store.renew_slots(self.replica, LEASE)
                await self._return(partial(_idle, now=now))
            except StoreError as exc:
                log.warning("slot lease not renewed", extra={"fields": {"error": str(exc)[:200]}})

    async def _return(self, due: Callable[[KeySlots], bool]) -> None:
        for (key_id, limit), slots in list(self._keys.items()):
            spare = slots.held - slots.active
            if (spare > 0 or slots.unsure) and slots.asking is None and due(slots):
                slots.held -= spare  # first: a request arriving meanwhile must not use a slot on its way back
                try:
                    await self.store.return_slots(key_id, self.replica, slots.held)
                except StoreError:
                    slots.held += spare  # still ours in the store: ours to use, or to return later
                    raise
                slots.unsure = False
            if slots.held == 0 and slots.active == 0 and not slots.unsure:
                self._keys.pop((key_id, limit), None)


def _idle(slots: KeySlots, now: float) -> bool:
    return now - slots.last_used >= IDLE
