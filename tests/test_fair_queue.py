"""The dispatch queue's order, alone (`sidecar/limits/queue.py`): shares by weight, no starvation, strict
classes, shedding the newest of the lowest class, idle time not banked. Properties over random workloads."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.limits.queue import DispatchQueue

HIGH, NORMAL, LOW = 0, 1, 2


def run(queue: DispatchQueue, demand: dict[str, tuple[float, int]], slots: int, tokens: int) -> dict[str, int]:
    """Every key always has a request waiting (weight, cost); `slots` run at once, the oldest ends first, until
    `tokens` were served. Returns the tokens served per key."""
    served: collections.Counter[str] = collections.Counter()
    for key, (weight, cost) in demand.items():
        queue.push(key, weight, NORMAL, cost)
    running: collections.deque[tuple[str, float, int]] = collections.deque()
    while sum(served.values()) < tokens:
        while len(running) < slots:
            ticket = queue.pop()
            assert ticket is not None
            running.append((ticket.key, ticket.weight, ticket.cost))
            queue.push(ticket.key, ticket.weight, NORMAL, ticket.cost)  # backlogged: the next one waits at once
        key, weight, cost = running.popleft()
        queue.charge(key, weight, 0)
        queue.done(key)
        served[key] += cost
    return served


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0, 0.5]), min_size=2, max_size=6),
    costs=st.lists(st.integers(100, 2000), min_size=6, max_size=6),
    slots=st.integers(1, 8),
)
def test_backlogged_keys_get_their_weights_share_of_tokens_within_ten_percent(weights, costs, slots):
    """Over a window of 100 of the largest requests per key, each key's share of the tokens served is within
    10% of its weight's share, whatever the sizes of its requests."""
    demand = {f"k{i}": (w, costs[i]) for i, w in enumerate(weights)}
    queue = DispatchQueue(size=1000)
    served = run(queue, demand, slots, tokens=100 * max(costs) * len(weights))
    total, weight_sum = sum(served.values()), sum(weights)
    for key, (weight, _) in demand.items():
        assert abs(served[key] / total - weight / weight_sum) <= 0.1 * weight / weight_sum, (key, served)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3000)), min_size=1, max_size=200),
)
def test_no_waiting_key_is_passed_over_by_more_than_one_round_of_the_others(arrivals):
    """Whatever arrives, a waiting request goes before any other key is served twice more than its share:
    between a ticket's push and its pop, no other key is popped more than (its requests then waiting) + 1
    times... bounded here as: each other key at most as many times as it had waiters, plus one."""
    queue = DispatchQueue(size=10_000)
    tickets = []
    for key, cost in arrivals:
        t, shed = queue.push(f"k{key}", 1.0, NORMAL, cost)
        assert t is not None and shed is None
        tickets.append(t)
    popped = []
    while (t := queue.pop()) is not None:
        popped.append(t)
    assert sorted(t.seq for t in popped) == sorted(t.seq for t in tickets)  # every one went, once
    max_cost = max(c for _, c in arrivals)
    # Fair by tokens: at any prefix of the order, the keys still waiting had service within one request of
    # the keys served (their counters never differ by more than the largest cost).
    counters: dict[str, int] = collections.defaultdict(int)
    waiting = collections.Counter(t.key for t in tickets)
    for t in popped:
        behind = [k for k, n in waiting.items() if n and k != t.key]
        assert all(counters[t.key] <= counters[k] + max_cost for k in behind), (t.key, dict(counters))
        counters[t.key] += t.cost
        waiting[t.key] -= 1


def test_a_light_key_goes_next_even_behind_a_heavy_keys_backlog():
    queue = DispatchQueue(size=100)
    for _ in range(24):
        queue.push("heavy", 1.0, NORMAL, 500)
    for _ in range(4):  # four of heavy's are running: charged
        queue.pop()
    queue.push("light", 1.0, NORMAL, 500)
    assert queue.pop().key == "light"
    assert queue.pop().key == "heavy"


def test_a_key_back_from_idle_does_not_bank_its_idle_time():
    queue = DispatchQueue(size=100)
    for _ in range(10):
        queue.push("a", 1.0, NORMAL, 100)
        queue.push("b", 1.0, NORMAL, 100)
    for _ in range(20):
        queue.pop()
    # c was away all along: it is lifted to the others' counter, so it gets one turn, not ten in a row
    for _ in range(5):
        queue.push("a", 1.0, NORMAL, 100)
        queue.push("c", 1.0, NORMAL, 100)
    order = [queue.pop().key for _ in range(10)]
    assert order[:4] in (["a", "c", "a", "c"], ["c", "a", "c", "a"]), order


def test_classes_are_strict_and_shedding_takes_the_newest_of_the_lowest():
    queue = DispatchQueue(size=3)
    low1, _ = queue.push("l", 1.0, LOW, 10)
    low2, _ = queue.push("l", 1.0, LOW, 10)
    normal, _ = queue.push("n", 1.0, NORMAL, 10)
    high, shed = queue.push("h", 1.0, HIGH, 10)  # full: the newest low waiter makes room
    assert high is not None and shed is low2
    assert queue.push("l", 1.0, LOW, 10) == (None, None)  # a low newcomer is the one refused
    high2, shed = queue.push("h", 1.0, HIGH, 10)
    assert shed is low1  # the last low one goes before any normal or high
    assert queue.push("n", 1.0, NORMAL, 10) == (None, None)  # a normal newcomer never pushes out a high
    assert [queue.pop() for _ in range(3)] == [high, high2, normal]
    assert queue.pop() is None


def test_fifo_is_arrival_order_whatever_the_class_and_refuses_the_newcomer_when_full():
    queue = DispatchQueue(size=2, fair=False)
    first, _ = queue.push("a", 1.0, LOW, 10)
    second, _ = queue.push("b", 1.0, HIGH, 10)
    assert queue.push("c", 1.0, HIGH, 10) == (None, None)
    assert [queue.pop(), queue.pop()] == [first, second]


def test_a_waiter_that_leaves_is_taken_out_once_and_idle_keys_are_forgotten():
    queue = DispatchQueue(size=10)
    t, _ = queue.push("a", 1.0, NORMAL, 10)
    assert queue.remove(t) and not queue.remove(t) and len(queue) == 0 and queue.pop() is None
    for i in range(1000):
        queue.dispatched(f"one-off-{i}", 1.0, 10)
        queue.done(f"one-off-{i}")
    assert queue.keys() <= 2  # each one-off key is at or below the floor once it is done
