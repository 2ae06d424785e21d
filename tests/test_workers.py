"""`server.workers = N` (#30): N processes serve one port (SO_REUSEPORT) under a parent that serves nothing. Both
workers answer; a key's rpm, concurrency and budget hold for the pod, not N times over; every request has exactly
one row after the drain; SIGTERM drains every worker and the parent exits 0; a worker that dies is restarted.
Each runs `python -m sidecar serve` as a real process, the requests through real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import time
import uuid

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import ConfigError, load
from sidecar.errors import RateLimited
from sidecar.limits.slots import SharedSlots
from sidecar.store import open_store
from tests.support.processes import cli, reap, start
from tests.support.waits import free_port, wait_for, wait_listening

PEPPER = "workers-test-pepper-0123456789abcdef"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def free_ports(n: int) -> int:
    """A port with the next n-1 free too (worker i's operations port is ops_port + i)."""
    for _ in range(50):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no run of free ports")


async def two_workers(tmp_path, fake, auth=False, **env):
    port, ops = free_port(), free_ports(2)
    extra = {"SIDECAR_AUTH_ENABLED": "true", "SIDECAR_AUTH_PEPPER": PEPPER} if auth else {}
    proc = start(
        tmp_path,
        fake.url,
        port,
        SIDECAR_SERVER_WORKERS="2",
        SIDECAR_SERVER_OPS_PORT=str(ops),
        SIDECAR_SERVER_DRAIN_GRACE="0",
        **extra,
        **env,
    )
    await wait_listening(port, proc)
    for i in range(2):
        await wait_listening(ops + i, proc)  # both workers listen before a request goes
    return proc, port, ops


def new_key(tmp_path, *flags):
    migrated = cli(tmp_path, "migrate", db=db(tmp_path), **pepper())
    assert migrated.returncode == 0, migrated.stderr
    made = cli(tmp_path, "keys", "create", "--name", uuid.uuid4().hex[:8], *flags, db=db(tmp_path), **pepper())
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def db(tmp_path):
    return f"sqlite:///{tmp_path}/p.db"


def pepper():
    return {"SIDECAR_AUTH_PEPPER": PEPPER}


async def post(port, key=None, request_id=None, script=None):
    """One request on a connection of its own (a new connection is what SO_REUSEPORT spreads)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if request_id:
        headers["x-request-id"] = request_id
    if script:
        headers["x-fake-script"] = orjson.dumps(script).decode()
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=headers) as r,
    ):
        await r.read()
        return r.status


async def served(ops):
    """Per worker, the requests it finished, as worker 0's operations port shows the pod: every worker's series,
    each labelled with its worker."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{ops}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    out = {s.labels["worker"]: 0.0 for s in samples if s.name == "sidecar_worker_up" and s.value == 1}
    for sample in samples:
        if sample.name == "sidecar_requests_total" and sample.labels["route"] == "/v1/chat/completions":
            out[sample.labels["worker"]] += sample.value
    return out


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    err = proc.stderr.read()
    reap(proc)
    return rc, err


def rows(tmp_path, *columns):
    with sqlite3.connect(tmp_path / "p.db") as conn:
        return conn.execute(f"SELECT {', '.join(columns)} FROM request_log").fetchall()


# --- configuration ---------------------------------------------------------------------------------------------


def test_workers_is_checked():
    assert load(None, {}, {}).server.workers == 1
    for value, says in (
        ("0", "server.workers: must be greater than 0"),
        ("65", "server.workers: at most 64"),
        ("two", "server.workers: expected an integer"),
    ):
        with pytest.raises(ConfigError, match=says):
            load(None, {"SIDECAR_SERVER_WORKERS": value}, {})
    with pytest.raises(ConfigError, match="needs a fixed server.port"):
        load(None, {"SIDECAR_SERVER_WORKERS": "2", "SIDECAR_SERVER_PORT": "0"}, {})
    with pytest.raises(ConfigError, match="which hold server.port"):
        load(
            None, {"SIDECAR_SERVER_WORKERS": "3", "SIDECAR_SERVER_PORT": "9001", "SIDECAR_SERVER_OPS_PORT": "9000"}, {}
        )
    with pytest.raises(ConfigError, match="past 65535"):
        load(None, {"SIDECAR_SERVER_WORKERS": "2", "SIDECAR_SERVER_OPS_PORT": "65535"}, {})


def test_a_port_in_use_stops_the_start_with_one_line(tmp_path, fake):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start(tmp_path, fake.url, port, SIDECAR_SERVER_WORKERS="2")
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


# --- one port, every row, one drain --------------------------------------------------------------------------


async def test_two_workers_share_the_port_and_every_request_has_one_row_after_the_drain(tmp_path, fake):
    proc, port, ops = await two_workers(tmp_path, fake)
    try:
        ids = [f"w-{i}" for i in range(40)]
        statuses = await asyncio.gather(*(post(port, request_id=rid) for rid in ids))
        assert statuses == [200] * 40
        by_worker = await served(ops)
        assert set(by_worker) == {"0", "1"} and sum(by_worker.values()) == 40
        assert all(by_worker.values()), by_worker  # the kernel spread the connections over both
        # Let the parent's children be seen draining: both stop, the parent exits 0.
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert err.count('"msg":"drained"') == 2 and '"msg":"workers stopped","status":0' in err
    assert '"msg":"drained","worker":0}' in err and '"msg":"drained","worker":1}' in err  # whose line it is
    stored = rows(tmp_path, "client_request_id")
    assert sorted(r[0] for r in stored) == sorted(ids)  # none lost, none doubled
    # each worker journaled into its own directory, and both emptied it
    assert not list((tmp_path / "spool").glob("requests.*.jsonl"))
    assert not list((tmp_path / "spool" / "worker-1").glob("requests.*.jsonl"))


async def test_worker_0s_operations_port_shows_and_drains_the_whole_pod(tmp_path, fake):
    """One scrape and one preStop hook see every worker: worker 0's /metrics holds each worker's series labelled
    with its index, and its /drain drains both (what vLLM's preStop in the chart calls)."""
    proc, port, ops = await two_workers(tmp_path, fake)
    try:
        assert await asyncio.gather(*(post(port) for _ in range(20))) == [200] * 20
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{ops + 1}/metrics") as r:
                own = await r.text()
            async with s.get(f"http://127.0.0.1:{ops}/metrics") as r:
                pod = await r.text()
        mine = [x for f in text_string_to_metric_families(own) for x in f.samples]
        assert mine and {x.labels.get("worker") for x in mine} == {"1"}  # a worker's own page: its series only
        families = list(text_string_to_metric_families(pod))
        names = [f.name for f in families]
        assert len(names) == len(set(names))  # each family once, its samples together, as the format wants
        samples = [x for f in families for x in f.samples]
        up = {x.labels["worker"]: x.value for x in samples if x.name == "sidecar_worker_up"}
        assert up == {"0": 1.0, "1": 1.0}
        rss = {x.labels["worker"] for x in samples if x.name == "process_resident_memory_bytes"}
        assert rss == {"0", "1"}  # the processes' own series too: `sum by (pod)` is the pod's memory
        assert sum((await served(ops)).values()) == 20

        async with aiohttp.ClientSession() as s:
            # Another worker's /drain from a peer that came through a proxy, without the workers' secret: refused.
            headers = {"x-forwarded-for": "203.0.113.9", "x-sidecar-peer": "guess"}
            async with s.post(f"http://127.0.0.1:{ops + 1}/drain", headers=headers) as r:
                assert r.status == 403
            async with s.post(f"http://127.0.0.1:{ops}/drain") as r:
                state = await r.json()
            assert state["draining"] is True and set(state["workers"]) == {"0", "1"}
            assert state["workers"]["1"]["draining"] is True  # worker 0 passed the drain on
            async with s.get(f"http://127.0.0.1:{ops + 1}/readyz") as r:
                assert r.status == 503 and (await r.json())["status"] == "draining"

            for _ in range(200):  # as the chart's wait-drain.py asks, until the pod says it drained
                async with s.post(f"http://127.0.0.1:{ops}/drain") as r:
                    state = await r.json()
                if state["drained"]:
                    break
                await asyncio.sleep(0.1)
            assert state["drained"] is True and state["workers"]["1"]["drained"] is True, state
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(port)  # both workers closed the client port (drain_grace 0)
    finally:
        rc, err = stop(proc)
    assert rc == 0, err


async def test_a_worker_that_dies_is_restarted_and_its_rows_are_kept(tmp_path, fake):
    proc, port, ops = await two_workers(tmp_path, fake)
    try:
        assert await asyncio.gather(*(post(port, request_id=f"a-{i}") for i in range(10))) == [200] * 10
        children = workers_of(proc.pid)
        assert len(children) == 2
        os.kill(children[1], signal.SIGKILL)
        await wait_for(lambda: len(set(workers_of(proc.pid)) - set(children)) == 1, 20, lambda: "not restarted")
        await wait_listening(ops + 1, proc)  # the new worker 1 took its operations port again
        assert await asyncio.gather(*(post(port, request_id=f"b-{i}") for i in range(10))) == [200] * 10
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert "worker exited: restarting it" in err
    stored = [r[0] for r in rows(tmp_path, "client_request_id")]
    assert sorted(stored) == sorted([f"a-{i}" for i in range(10)] + [f"b-{i}" for i in range(10)])


async def test_rows_a_gone_worker_journaled_are_stored_by_the_next_start_with_fewer_workers(tmp_path, fake):
    """Killed without a drain, the workers leave their rows in their journals; started again with one worker,
    worker 1's journal is moved into worker 0's and replayed: no row waits for a worker that never comes back."""
    proc, port, ops = await two_workers(tmp_path, fake, SIDECAR_WRITER_FLUSH_INTERVAL_MS="600000")
    try:
        ids = [f"j-{i}" for i in range(20)]
        assert await asyncio.gather(*(post(port, request_id=rid) for rid in ids)) == [200] * 20
        assert all((await served(ops)).values())
        children = workers_of(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)  # no restart, no lifeline: the workers die as a pod killed would
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        reap(proc)
    assert list((tmp_path / "spool" / "worker-1").glob("requests.*.jsonl"))
    assert rows(tmp_path, "client_request_id") == []  # nothing flushed yet: all of it is in the journals
    port = free_port()
    again = start(tmp_path, fake.url, port, SIDECAR_SERVER_DRAIN_GRACE="0")
    try:
        await wait_listening(port, again)
    finally:
        rc, err = stop(again)
    assert rc == 0, err
    assert sorted(r[0] for r in rows(tmp_path, "client_request_id")) == sorted(ids)
    assert not list((tmp_path / "spool" / "worker-1").glob("requests.*.jsonl"))


def workers_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# --- limits for the pod --------------------------------------------------------------------------------------


async def test_a_keys_rpm_holds_for_both_workers_together(tmp_path, fake):
    key = new_key(tmp_path, "--rpm", "30")
    proc, port, ops = await two_workers(tmp_path, fake, auth=True)
    statuses = []
    try:
        began = time.monotonic()
        for _ in range(6):  # waves a second apart: a worker refused by an empty balance asks it again after 1 s
            statuses += await asyncio.gather(*(post(port, key) for _ in range(15)))
            await asyncio.sleep(1.1)
        refill = (time.monotonic() - began) * 30 / 60  # the bucket refills at rpm / 60 a second meanwhile
        by_worker = await served(ops)
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert all(by_worker.values()), by_worker  # both workers took requests of the key
    admitted = statuses.count(200)
    assert set(statuses) == {200, 429}
    # 30 for the pod and its refill (two workers each alone: 60, what each one's own bucket allows); fewer only
    # by the fractions of a request each holds unspent when the balance is empty.
    assert 28 <= admitted <= 30 + refill + 1, (admitted, refill, by_worker)


async def test_a_keys_concurrency_holds_for_both_workers_together(tmp_path, fake):
    key = new_key(tmp_path, "--concurrency", "2")
    proc, port, _ = await two_workers(tmp_path, fake, auth=True)
    try:
        statuses = await asyncio.gather(*(post(port, key, script={"delay_headers": 1.0}) for _ in range(8)))
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    assert 1 <= statuses.count(200) <= 2 and statuses.count(429) >= 6, statuses


async def test_a_keys_budget_holds_for_both_workers_together(tmp_path, fake):
    budget = 200
    key = new_key(tmp_path, "--budget-tokens", str(budget), "--budget-period", "10m")
    proc, port, _ = await two_workers(tmp_path, fake, auth=True)
    script = {"prompt_tokens": 1}  # each uses 1 + 5 tokens, within what it reserves: never over the budget
    try:
        statuses = [await post(port, key, script=script) for _ in range(60)]
    finally:
        rc, err = stop(proc)
    assert rc == 0, err
    used = sum(r[0] or 0 for r in rows(tmp_path, "total_tokens"))
    assert statuses.count(200) >= 10 and 429 in statuses
    assert used <= budget, used


async def test_sqlite_borrows_for_several_keys_at_once_each_get_their_transaction(tmp_path):
    """The shared limits on SQLite (workers > 1) borrow for many keys at once on one connection: each borrow is
    its own transaction, none fails for meeting another's."""
    store = open_store(db(tmp_path), 4, 10.0, 10.0)
    await store.open()
    await store.migrate()
    try:
        got = await asyncio.gather(*(store.borrow_rate(f"k{i}", "rpm", 30.0, 0.5, 1.0, 0.125) for i in range(8)))
        assert [granted for granted, _ in got] == [3.75] * 8
        period = (time.time() - 10, time.time() + 600)
        budgets = [store.borrow_budget(f"k{i}", "b", 100, period, 10.0, 0.125, 10.0) for i in range(8)]
        assert [granted for granted, _ in await asyncio.gather(*budgets)] == [12.5] * 8
    finally:
        await store.close()


async def test_a_burst_of_one_keys_requests_asks_the_store_for_its_slots_together(tmp_path):
    """A thousand streams of one key arriving at once (on SQLite with workers, each question to the store is a
    write transaction, one at a time for the pod): the waiting requests' slots are asked for together."""
    store = open_store(db(tmp_path), 4, 10.0, 10.0)
    await store.open()
    await store.migrate()
    slots = SharedSlots(store)
    try:
        held = await asyncio.gather(*(slots.take("k", 1000) for _ in range(200)))
        assert all(h is not None for h in held)
        assert slots.asks <= 3, slots.asks  # one for the first, one for all that waited meanwhile
        for hold in held:
            hold.release()
        over = await asyncio.gather(*(slots.take("k2", 150) for _ in range(200)), return_exceptions=True)
        assert sum(isinstance(o, RateLimited) for o in over) == 50  # never more than the limit
    finally:
        await slots.close()
        await store.close()


async def test_a_borrow_cancelled_while_waiting_for_the_write_lock_leaves_no_transaction_open(tmp_path):
    """A client that leaves while its request's borrow waits for SQLite's write lock (another worker holds it):
    the borrow still ends its transaction, so the connection (and the lock, for every worker) is free after."""
    store = open_store(db(tmp_path), 4, 10.0, 10.0)
    await store.open()
    await store.migrate()
    other = sqlite3.connect(tmp_path / "p.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another worker's write
        waiting = asyncio.ensure_future(store.borrow_rate("k", "rpm", 30.0, 0.5, 1.0, 0.125))
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.sleep(0.1)
        other.execute("COMMIT")
        granted, _ = await store.borrow_rate("k2", "rpm", 30.0, 0.5, 1.0, 0.125)
        assert granted == 3.75
        other.execute("BEGIN IMMEDIATE")  # the write lock is free again: nobody holds a transaction open
        other.execute("COMMIT")
    finally:
        other.close()
        await store.close()


async def test_rows_wait_briefly_for_another_workers_write_instead_of_spooling(tmp_path):
    """Two workers' writers share one SQLite file: a batch that meets the other's short write transaction tries
    again a few ms later (off the event loop's back) instead of calling it an outage."""
    store = open_store(db(tmp_path), 4, 10.0, 10.0)
    await store.open()
    await store.migrate()
    other = sqlite3.connect(tmp_path / "p.db", isolation_level=None, check_same_thread=False)
    row = {
        "request_id": "r1", "method": "POST", "path": "/v1/chat/completions", "stream": False, "status": 200,
        "outcome": "completed", "usage_source": "upstream", "latency_ms": 1.0, "bytes_in": 1, "bytes_out": 1,
        "chunks": 0, "started_at": time.time(), "finished_at": time.time(),
    }  # fmt: skip
    try:
        other.execute("BEGIN IMMEDIATE")  # the other worker's batch
        asyncio.get_running_loop().call_later(0.01, other.execute, "COMMIT")
        assert await store.insert_requests([orjson.dumps(row)]) == 1
    finally:
        other.close()
        await store.close()


async def test_a_retention_sweep_waits_briefly_for_another_workers_write(tmp_path):
    """Every worker sweeps retention a few seconds after its start, when the other's writer is busiest: a sweep
    that meets the other's write transaction tries again a few ms later instead of failing with a warning
    ("database is locked", seen on every start of two workers before)."""
    store = open_store(db(tmp_path), 4, 10.0, 10.0)
    await store.open()
    await store.migrate()
    other = sqlite3.connect(tmp_path / "p.db", isolation_level=None, check_same_thread=False)
    old = time.time() - 86_400
    row = {
        "request_id": "old", "method": "POST", "path": "/v1/chat/completions", "stream": False, "status": 200,
        "outcome": "completed", "usage_source": "upstream", "latency_ms": 1.0, "bytes_in": 1, "bytes_out": 1,
        "chunks": 0, "started_at": old, "finished_at": old,
    }  # fmt: skip
    try:
        assert await store.insert_requests([orjson.dumps(row)]) == 1
        other.execute("BEGIN IMMEDIATE")  # the other worker's batch
        asyncio.get_running_loop().call_later(0.01, other.execute, "COMMIT")
        assert await store.delete_older("request_log", time.time() - 3600, 1000) == 1
    finally:
        other.close()
        await store.close()
    assert rows(tmp_path, "request_id") == []
