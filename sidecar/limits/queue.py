"""The dispatch queue: requests waiting for an upstream slot, and the order they go in (pure, no I/O, no clock).

Order (`fair = True`, `limits.queue_order = "fair"`): the highest priority class waiting goes first (`high`,
then `normal`, then `low`); within a class, the Virtual Token Counter (Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024): every key has a counter of the service it got, in tokens divided by its weight,
and the next request is the oldest of the waiting key with the least counter. Service is charged as it is
known: a request's reservation when it is dispatched, corrected to its real usage when it settles
(`charge`). A key that starts waiting is lifted to the least counter among the keys waiting (or, with none,
to the highest counter a dispatch left), so idle time is never banked: a key that was away does not come back
owed a burst. `fair = False` (`"fifo"`): arrival order, classes ignored.

When the queue is full, the newest waiter of the lowest class waiting is refused first, and a newcomer is
refused rather than a waiter of a class above its own: `low` is sheddable, `high` is never refused while a
`low` request waits. Starvation: within a class, a waiting key is served before any other key's counter can
pass it again, so it waits at most one round of the other waiting keys (each at most one request of at most
the largest reservation over its weight ahead of it); across classes the order is strict, and
`limits.queue_timeout` bounds the wait of a lower class under a higher one's saturation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

PRIORITIES = ("high", "normal", "low")  # classes, in the order they go; an index is the class's rank


@dataclass(eq=False, slots=True)
class Ticket:
    """One waiting request. `handle` is the caller's (a future to wake); `rank` its class's index in PRIORITIES."""

    key: str
    weight: float
    rank: int
    cost: int  # the tokens the request reserves: charged to its key when it is dispatched
    seq: int
    handle: Any = None
    queued: bool = True


@dataclass(slots=True)
class _Waiting:
    tickets: deque[Ticket] = field(default_factory=deque)


class DispatchQueue:
    """Waiting requests, per class and key; `push` to wait, `pop` the next to go, `remove` one that left."""

    __slots__ = ("_classes", "_counters", "_floor", "_inflight", "_seq", "fair", "size")

    def __init__(self, size: int, fair: bool = True) -> None:
        self.size = size
        self.fair = fair
        self._classes: list[dict[str, _Waiting]] = [{} for _ in PRIORITIES]  # rank -> key -> its waiters
        self._counters: dict[str, float] = {}  # key -> weighted service (tokens / weight)
        self._inflight: dict[str, int] = {}  # key -> its dispatched requests not yet settled
        self._floor = 0.0  # the highest counter a dispatch left: where a key back from idle, alone, begins
        self._seq = 0

    def __len__(self) -> int:
        if not any(self._classes):  # nobody waits (every request that is let through asks): no generator
            return 0
        return sum(len(w.tickets) for waiting in self._classes for w in waiting.values())

    def depth(self, rank: int) -> int:
        return sum(len(w.tickets) for w in self._classes[rank].values())

    def counter(self, key: str) -> float:
        return self._counters.get(key, 0.0)

    def push(
        self, key: str, weight: float, rank: int, cost: int, handle: Any = None
    ) -> tuple[Ticket | None, Ticket | None]:
        """Queue a request: (its ticket, None), or (its ticket, the waiter it pushed out) when the queue was full
        and a waiter of a lower class made room, or (None, None) when the queue is full and the newcomer is the
        one to refuse."""
        shed = None
        if len(self) >= self.size:
            shed = self._newest_of_lowest()
            if shed is None or (self.fair and shed.rank <= rank) or not self.fair:
                return None, None  # the newcomer is the newest of the lowest class: it is the one refused
            self.remove(shed)
        self._seq += 1
        rank = rank if self.fair else 0
        ticket = Ticket(key, weight, rank, cost, self._seq, handle)
        waiting = self._classes[rank]
        mine = waiting.get(key)
        if mine is None:
            mine = waiting[key] = _Waiting()
            if self.fair and not self._inflight.get(key):
                self._lift(key, rank)
        mine.tickets.append(ticket)
        return ticket, shed

    def _lift(self, key: str, rank: int) -> None:
        """A key back from idle (nothing waiting, nothing running): its counter is at least the least counter of
        the keys waiting in its class (or, with none, the highest counter a dispatch left): idle time is not
        banked. A key with requests running is not lifted: its counter already counts what it is getting."""
        others = [self._counters.get(k, 0.0) for k in self._classes[rank] if k != key]
        base = min(others) if others else self._floor
        self._counters[key] = max(self._counters.get(key, 0.0), base)

    def pop(self) -> Ticket | None:
        """The next request to dispatch (charged its reservation), or None when nobody waits."""
        for waiting in self._classes:
            if not waiting:
                continue
            if self.fair:
                # ties (a key just lifted to the others' level) go to the key with less running
                key = min(
                    waiting,
                    key=lambda k: (self._counters.get(k, 0.0), self._inflight.get(k, 0), waiting[k].tickets[0].seq),
                )
            else:
                key = min(waiting, key=lambda k: waiting[k].tickets[0].seq)
            mine = waiting[key]
            ticket = mine.tickets.popleft()
            if not mine.tickets:
                del waiting[key]
            ticket.queued = False
            self.dispatched(ticket.key, ticket.weight, ticket.cost)
            return ticket
        return None

    def dispatched(self, key: str, weight: float, cost: int) -> None:
        """A request of `key` goes to the upstream (from the queue, or at once when nobody waited): its
        reservation is charged to the key's counter."""
        counter = self._counters.get(key, self._floor) + cost / weight
        self._counters[key] = counter
        self._floor = max(self._floor, counter)
        self._inflight[key] = self._inflight.get(key, 0) + 1

    def charge(self, key: str, weight: float, delta: int) -> None:
        """A dispatched request settled: `delta` = real usage less its reservation (negative: a refund)."""
        if key in self._counters:
            self._counters[key] = max(0.0, self._counters[key] + delta / weight)

    def done(self, key: str) -> None:
        """A dispatched request of `key` ended. A key with nothing in flight or waiting whose counter is no
        more than the floor is forgotten: coming back, it would be lifted to the floor anyway."""
        left = self._inflight.get(key, 0) - 1
        if left > 0:
            self._inflight[key] = left
            return
        self._inflight.pop(key, None)
        if self._counters.get(key, 0.0) <= self._floor and not (any(self._classes) and self._waits(key)):
            self._counters.pop(key, None)

    def _waits(self, key: str) -> bool:
        return any(key in w for w in self._classes)

    def remove(self, ticket: Ticket) -> bool:
        """Take a waiter out (it timed out, left or was shed); False when it was no longer waiting."""
        if not ticket.queued:
            return False
        ticket.queued = False
        waiting = self._classes[ticket.rank]
        mine = waiting.get(ticket.key)
        if mine is None:
            return False
        try:
            mine.tickets.remove(ticket)
        except ValueError:
            return False
        if not mine.tickets:
            del waiting[ticket.key]
        return True

    def _newest_of_lowest(self) -> Ticket | None:
        for waiting in reversed(self._classes):
            if waiting:
                return max((w.tickets[-1] for w in waiting.values()), key=lambda t: t.seq)
        return None

    def per_key(self) -> dict[str, tuple[list[int], int]]:
        """What each key has here now: (its waiters per class, its dispatched requests not yet ended)."""
        out: dict[str, tuple[list[int], int]] = {}
        for rank, waiting in enumerate(self._classes):
            for key, mine in waiting.items():
                out.setdefault(key, ([0] * len(PRIORITIES), 0))[0][rank] = len(mine.tickets)
        for key, n in self._inflight.items():
            out[key] = (out[key][0] if key in out else [0] * len(PRIORITIES), n)
        return out

    def keys(self) -> int:
        """Keys the queue keeps a counter for (bounded: idle keys at the floor are forgotten)."""
        return len(self._counters)
