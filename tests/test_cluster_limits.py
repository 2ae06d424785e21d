"""A key's budget across three `sidecar serve` processes sharing one PostgreSQL (#17): the balance in the store is
the one truth; each replica spends an allowance it borrowed, so together they stop where the budget ends, not
three times over, and a new period starts afresh for all of them."""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import re
import time
from zoneinfo import ZoneInfo

import aiohttp
import psycopg
import pytest

from sidecar.limits.borrowing import EMPTY_RECHECK, IDLE
from sidecar.limits.periods import period_bounds
from sidecar.limits.slots import LEASE
from tests.support.processes import reap, start
from tests.support.waits import free_port, wait_listening

ADMIN = "cluster-admin-token"
PEPPER = "cluster-pepper-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


class Cluster:
    def __init__(self, tmp_path, upstream: str, pg_url: str, n: int = 3) -> None:
        self.tmp_path, self.upstream, self.pg_url = tmp_path, upstream, pg_url
        self.ports = [free_port() for _ in range(n)]
        self.procs = [self._start(i, port) for i, port in enumerate(self.ports)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def _start(self, i: int, port: int):
        return start(
            self.tmp_path / f"r{i}",
            self.upstream,
            port,
            SIDECAR_STORE_URL=self.pg_url,
            SIDECAR_AUTH_ENABLED="true",
            SIDECAR_AUTH_PEPPER=PEPPER,
            SIDECAR_SERVER_ADMIN_TOKEN=ADMIN,
            SIDECAR_SERVER_DRAIN_GRACE="0",
            SIDECAR_WRITER_FLUSH_INTERVAL_MS="20",
        )

    async def restart(self, i: int) -> None:
        """Replica `i` again, after it ended: a new process on its data directory (its journal) and a new port."""
        reap(self.procs[i])
        self.ports[i] = free_port()
        self.procs[i] = self._start(i, self.ports[i])
        self.urls[i] = f"http://127.0.0.1:{self.ports[i]}"
        await wait_listening(self.ports[i], self.procs[i])

    async def ready(self) -> None:
        for port, proc in zip(self.ports, self.procs, strict=True):
            await wait_listening(port, proc)

    def close(self) -> None:
        for proc in self.procs:
            reap(proc)


async def make_key(session, url, **fields) -> tuple[str, str]:
    async with session.post(
        url + "/admin/keys", json={"name": "shared", **fields}, headers={"authorization": f"Bearer {ADMIN}"}
    ) as r:
        body = await r.json()
        assert r.status == 201, body
        return body["key"], body["id"]


async def chat(session, url, key, stream=False):
    body = {**CHAT, "stream": True} if stream else CHAT
    async with session.post(url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}) as r:
        return r.status, await r.read()


def used(pg_url: str, kid: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(total_tokens), 0) FROM request_log WHERE key_id = %s", (kid,)
        ).fetchone()
    return int(row[0])


async def until_refused_everywhere(session, urls, key) -> tuple[int, int]:
    """Requests round-robin, 6 at a time, until every replica refuses; (accepted, largest reservation seen)."""
    accepted, need, refused = 0, 0, set()
    turn = itertools.cycle(range(len(urls)))
    while len(refused) < len(urls):
        batch = [next(turn) for _ in range(6)]
        answers = await asyncio.gather(*(chat(session, urls[i], key, stream=n % 2 == 0) for n, i in enumerate(batch)))
        for i, (status, body) in zip(batch, answers, strict=True):
            if status == 200:
                accepted += 1
                refused.discard(i)
            else:
                assert status == 429 and b"insufficient_quota" in body, body
                need = max(need, int(re.search(rb"reserves (\d+)", body).group(1)))
                refused.add(i)
        assert accepted < 10_000
    return accepted, need


async def test_three_replicas_stop_at_one_budget(fake, pg_url, tmp_path):
    """Spend one budget through three replicas in rounds, each until every replica refuses, letting the idle
    allowances go back between rounds: it ends at a round that admits nothing, with never more than the budget
    used and less than one request's reservation left in the store (nothing stranded in any replica)."""
    budget = 3000
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, kid = await make_key(s, cluster.urls[0], budget_tokens=budget, budget_period="1h")
            total, need, rounds = 0, 0, 0
            while True:
                accepted, largest = await until_refused_everywhere(s, cluster.urls, key)
                total, need, rounds = total + accepted, max(need, largest), rounds + 1
                await all_returned(pg_url, kid, budget)  # idle allowances go back to the shared balance
                if accepted == 0:
                    break
                assert rounds < 12, "the replicas kept admitting round after round"
            spent = used(pg_url, kid)
    finally:
        cluster.close()
    print(f"\nbudget {budget} over 3 replicas: {spent} used by {total} requests in {rounds} rounds (need {need})")
    assert spent <= budget  # never more than the budget, for three replicas together
    assert budget - spent < need  # the balance was spent down to less than one request's reservation
    assert total >= budget // 40  # 16 tokens each: the budget bought what it should


async def all_returned(pg_url: str, kid: str, budget: int, timeout: float = IDLE * 4) -> None:
    """Wait until every replica has given its allowance back: the store's balance plus the rows' usage make the
    budget (the sweep runs every IDLE / 2 and returns what was idle for IDLE)."""
    deadline = time.monotonic() + timeout
    while abs(balance_left(pg_url, kid) + used(pg_url, kid) - budget) >= 1:
        assert time.monotonic() < deadline, (balance_left(pg_url, kid), used(pg_url, kid))
        await asyncio.sleep(0.25)


async def mixed(session, url, key, n: int) -> int:
    """One request of five kinds by `n`: plain, streamed, cut by the upstream, cut by the client, an upstream
    error; the status (0: the client went away)."""
    kind = n % 5
    script = {2: '{"drop_after": 2}', 3: '{"hang_after": 2}', 4: '{"status": 500}'}.get(kind)
    headers = {"authorization": f"Bearer {key}", **({"x-fake-script": script} if script else {})}
    body = {**CHAT, "stream": kind in (1, 2, 3)}
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            if kind == 3 and r.status == 200:
                await r.content.readany()  # the first chunk, then the client hangs up
                return 0
            body = await r.read()
            if b"insufficient_quota" in body:
                mixed.need = max(mixed.need, int(re.search(rb"reserves (\d+)", body).group(1)))  # type: ignore[attr-defined]
                return 429
            return r.status
    except aiohttp.ClientPayloadError:
        return 502  # the upstream's cut, relayed


mixed.need = 0  # type: ignore[attr-defined]  # the largest reservation refused


def balance_left(pg_url: str, kid: str) -> float:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT level FROM limit_balances WHERE key_id = %s AND dim = 'budget'", (kid,))
        return sum(float(level) for (level,) in rows.fetchall())


async def test_a_minute_budget_holds_across_replicas_reconciles_and_resets(fake, pg_url, tmp_path):
    """10,000 tokens per `1m` across three replicas, spent by plain and streamed answers, upstream cuts, client
    disconnects and upstream errors: it stops at the budget, the store's balance ends as the budget less what
    the rows say was used, and the next minute starts afresh on every replica."""
    budget = 10_000
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, kid = await make_key(s, cluster.urls[0], budget_tokens=budget, budget_period="1m")
            _, end = period_bounds("1m", time.time(), ZoneInfo("UTC"))
            if end - time.time() < 30:  # spend, and let the allowances go back, within one minute
                await asyncio.sleep(end - time.time() + 0.2)
                _, end = period_bounds("1m", time.time(), ZoneInfo("UTC"))
            refused, counts, n = set(), collections.Counter(), 0
            while len(refused) < 3:
                turn = [(n + i) % 3 for i in range(15)]
                answers = await asyncio.gather(*(mixed(s, cluster.urls[i], key, n + j) for j, i in enumerate(turn)))
                n += len(turn)
                counts.update((n - len(turn) + j) % 5 for j, status in enumerate(answers) if status != 429)
                for i, status in zip(turn, answers, strict=True):
                    (refused.add if status == 429 else refused.discard)(i)
                assert n < 5000
            while fake.in_flight:  # the hung-up streams end at the upstream, and settle
                await asyncio.sleep(0.05)
            await asyncio.sleep(EMPTY_RECHECK + 0.5)  # a replica refused just now would not ask the store again yet
            for _ in range(3):  # one replica at a time, so what requests in flight did not use is spent too;
                admitted = 0  # again once the others' allowances went back, until a pass admits nothing
                for url in cluster.urls:
                    while await mixed(s, url, key, 0) == 200:
                        counts[0] += 1
                        admitted += 1
                await asyncio.sleep(IDLE * 2)  # every replica's allowance goes back to the balance
                if not admitted or end - time.time() < IDLE * 4:
                    break
            spent, left = used(pg_url, kid), balance_left(pg_url, kid)
            assert time.time() < end, "the test did not finish within one period"
            await asyncio.sleep(end - time.time() + 0.2)
            statuses = [(await chat(s, url, key))[0] for url in cluster.urls]
    finally:
        cluster.close()
    print(f"\nbudget {budget}/1m over 3 replicas: {spent} used, {left:g} left; admitted by kind {dict(counts)}")
    assert all(counts[kind] >= 20 for kind in range(5))  # every kind of ending was spent on
    assert abs(left - (budget - spent)) < 1e-6  # reconciled: the store's balance is what the rows say is left
    # Stopped at the budget: what is left is less than one refused request's reservation per replica.
    assert budget - 3 * mixed.need < spent <= budget, mixed.need
    assert statuses == [200, 200, 200]


@pytest.fixture(autouse=True)
def _quiet_fake(fake):
    fake.script.chunks = 5  # 11 prompt + 5 completion tokens per answer, streamed or not


async def burst(session, urls, key, n: int) -> tuple[int, float]:
    """n requests round-robin over the replicas, 10 at a time; (accepted, seconds it took)."""
    began = time.monotonic()
    statuses: list[int] = []
    turn = itertools.cycle(urls)
    for first in range(0, n, 10):
        batch = [next(turn) for _ in range(min(10, n - first))]
        statuses += [status for status, _ in await asyncio.gather(*(chat(session, url, key) for url in batch))]
    assert set(statuses) <= {200, 429}, statuses
    return statuses.count(200), time.monotonic() - began


async def burst_on_a_cluster(fake, pg_url, tmp_path, **limits) -> tuple[int, float, int]:
    """Three replicas, one key with `limits`, 300 requests: (accepted, seconds, tokens the rows say were used)."""
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, kid = await make_key(s, cluster.urls[0], **limits)
            accepted, took = await burst(s, cluster.urls, key, 300)
            await asyncio.sleep(0.5)  # the last rows land
            return accepted, took, used(pg_url, kid)
    finally:
        cluster.close()


async def test_requests_per_minute_hold_across_three_replicas(fake, pg_url, tmp_path):
    accepted, took, _ = await burst_on_a_cluster(fake, pg_url, tmp_path, rpm=60)
    print(f"\nrpm=60 over 3 replicas: {accepted} of 300 accepted in {took:.1f} s")
    # 60 in the bucket, plus what it refilled while the burst ran (one a second); never 60 per replica.
    assert 60 - 3 * 8 <= accepted <= 60 + math.ceil(took) + 1, (accepted, took)


async def test_tokens_per_minute_hold_across_three_replicas(fake, pg_url, tmp_path):
    accepted, took, spent = await burst_on_a_cluster(fake, pg_url, tmp_path, tpm=2000)
    print(f"\ntpm=2000 over 3 replicas: {accepted} accepted, {spent} tokens used in {took:.1f} s")
    # Each request reserves its prompt estimate + 20 and uses 16; what it did not use comes back to the allowance
    # of the replica that admitted it. So the three together use at most the bucket and its refill, never 3x.
    assert spent <= 2000 + 2000 / 60 * took + 3 * 40, (spent, took)
    assert accepted >= (2000 - 3 * 2000 / 8) // 40, accepted


async def stream_for(session, url, key, chunks: int) -> int:
    body = {**CHAT, "stream": True}
    headers = {"authorization": f"Bearer {key}", "x-fake-script": f'{{"chunks": {chunks}, "delay_chunks": 0.05}}'}
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()
            return r.status
    except aiohttp.ClientError:
        return 0


async def test_concurrency_holds_across_three_replicas(fake, pg_url, tmp_path):
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, _ = await make_key(s, cluster.urls[0], concurrency=8)
            turn = itertools.cycle(cluster.urls)
            statuses = await asyncio.gather(*(stream_for(s, next(turn), key, 20) for _ in range(60)))
    finally:
        cluster.close()
    print(
        f"\nconcurrency=8 over 3 replicas: upstream saw at most {fake.max_in_flight} at once; {statuses.count(200)} ran"
    )
    assert set(statuses) <= {200, 429}
    assert fake.max_in_flight <= 8 and statuses.count(200) >= 8  # never 8 per replica, and all 8 were used


async def test_a_killed_replicas_slots_come_back_within_the_lease(fake, pg_url, tmp_path):
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, _ = await make_key(s, cluster.urls[0], concurrency=4)
            held = [asyncio.create_task(stream_for(s, cluster.urls[0], key, 400)) for _ in range(4)]
            while fake.in_flight < 4:
                await asyncio.sleep(0.05)
            assert (await chat(s, cluster.urls[1], key))[0] == 429  # all four are held by replica 0
            cluster.procs[0].kill()  # SIGKILL: no drain, no goodbye to the store
            killed = time.monotonic()
            await asyncio.gather(*held)
            while (status := (await chat(s, cluster.urls[1], key))[0]) != 200:
                assert status == 429
                assert time.monotonic() - killed < LEASE + 5, "the dead replica's slots never came back"
                await asyncio.sleep(0.25)
            recovered = time.monotonic() - killed
    finally:
        cluster.close()
    print(f"\nslots of a SIGKILLed replica usable again after {recovered:.1f} s (lease {LEASE:g} s)")
    assert recovered <= LEASE + 5


async def test_a_killed_replicas_borrowed_budget_comes_back_within_the_lease(fake, pg_url, tmp_path):
    """A replica borrows an allowance of a key's budget for one request, is SIGKILLed (no give-back) and
    restarted, twice over: each time, what it borrowed and did not spend goes back to the balance within the
    lease, so the balance is again the budget less what the rows used: nothing lost, nothing counted twice."""
    budget = 584
    cluster = Cluster(tmp_path, fake.url, pg_url, n=2)
    recovered = []
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, kid = await make_key(s, cluster.urls[0], budget_tokens=budget, budget_period="month")
            for crash in range(1, 3):
                assert (await chat(s, cluster.urls[0], key))[0] == 200
                stored_by = time.monotonic() + 10
                while used(pg_url, kid) < crash * 16:  # its row is stored (the replica is idle for under IDLE)
                    assert time.monotonic() < stored_by, "the request's row was never stored"
                    await asyncio.sleep(0.02)
                held = budget - used(pg_url, kid) - balance_left(pg_url, kid)
                assert held > 0  # replica 0 holds what it borrowed and did not spend
                cluster.procs[0].kill()  # SIGKILL: no drain, no give-back
                killed = time.monotonic()
                await cluster.restart(0)
                while abs(balance_left(pg_url, kid) + used(pg_url, kid) - budget) > 1e-6:
                    assert time.monotonic() - killed < LEASE + IDLE / 2 + 5, (held, balance_left(pg_url, kid))
                    await asyncio.sleep(0.25)
                recovered.append((held, round(time.monotonic() - killed, 1)))
            spent = used(pg_url, kid)
    finally:
        cluster.close()
    print(f"\nbudget {budget}: (held by the killed replica, back after seconds) {recovered}; {spent} used")
    assert spent == 2 * 16


async def borrow_statements(session, urls) -> int:
    total = 0
    for url in urls:
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        for name in ("sidecar_limit_borrows_total", "sidecar_limit_slot_asks_total"):
            total += int(float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)))
    return total


async def test_steady_state_costs_few_store_statements_per_request(fake, pg_url, tmp_path):
    """Limits far from reached: one borrow per replica and kind serves many requests."""
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            limits = {"rpm": 1_000_000, "tpm": 1_000_000_000, "concurrency": 100}
            key, _ = await make_key(s, cluster.urls[0], budget_tokens=10**9, budget_period="day", **limits)
            accepted, _ = await burst(s, cluster.urls, key, 600)
            statements = await borrow_statements(s, cluster.urls)
    finally:
        cluster.close()
    print(f"\nsteady state: {statements} borrow statements for {accepted} requests ({statements / accepted:.3f} each)")
    assert accepted == 600 and statements / accepted <= 0.05


async def test_ratelimit_headers_give_the_figure_for_the_whole_deployment(fake, pg_url, tmp_path):
    """After 30 requests spread over three replicas, each says about 30 of 60 are left, not its own 50."""
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, _ = await make_key(s, cluster.urls[0], rpm=60, tpm=60_000)
            auth = {"authorization": f"Bearer {key}"}
            began, seen = time.monotonic(), []
            for n in range(30):
                async with s.post(cluster.urls[n % 3] + "/v1/chat/completions", json=CHAT, headers=auth) as r:
                    assert r.status == 200
                    seen.append((r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-limit-requests"]))
                    tokens_left = int(r.headers["x-ratelimit-remaining-tokens"])
            took = time.monotonic() - began
    finally:
        cluster.close()
    last = [int(left) for left, _ in seen[-3:]]
    print(f"\nremaining-requests after 30 of rpm=60 over 3 replicas ({took:.1f} s): {last}; tokens left {tokens_left}")
    assert {limit for _, limit in seen} == {"60"}
    # Low by at most what the two others hold unspent, high by at most what they borrowed since this replica's
    # last borrow (each borrow an eighth of what was left: under 8 here), plus the refill; each alone says 50.
    for left in last:
        assert 30 - 2 * 8 <= left <= 30 + 2 * 8 + math.ceil(took), last
    assert 60_000 - 30 * 40 - 2 * 60_000 / 8 <= tokens_left <= 60_000, tokens_left


async def test_an_overloaded_key_still_gets_the_refill(fake, pg_url, tmp_path):
    """Under steady overload, refusals must not stop a replica from asking the store again: the key gets its
    bucket and then the refill (10 a second for rpm = 600), not just the bucket."""
    cluster = Cluster(tmp_path, fake.url, pg_url)
    try:
        await cluster.ready()
        async with aiohttp.ClientSession() as s:
            key, _ = await make_key(s, cluster.urls[0], rpm=600)
            began, statuses = time.monotonic(), collections.Counter()

            async def hammer(url: str) -> None:
                while time.monotonic() - began < 6:
                    statuses[(await chat(s, url, key))[0]] += 1

            await asyncio.gather(*(hammer(url) for url in cluster.urls * 4))
            took = time.monotonic() - began
    finally:
        cluster.close()
    print(f"\nrpm=600 over 3 replicas, overloaded for {took:.1f} s: {dict(statuses)}")
    assert set(statuses) == {200, 429}
    assert 600 + 10 * (took - 2) - 3 * 8 <= statuses[200] <= 600 + 10 * took + 1, (statuses, took)
