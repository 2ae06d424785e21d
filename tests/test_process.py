"""The sidecar as a real process: SIGTERM drains with rows == requests; SIGKILL loses nothing with the spool."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.bodies import STREAM
from tests.support.processes import count_rows, reap, start
from tests.support.waits import free_port, wait_listening

CHAT = STREAM  # these tests stream


async def stream_many(url, n, body=CHAT):
    async def one(s):
        try:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                return r.status, await r.read()
        except aiohttp.ClientError as exc:
            return 0, repr(exc).encode()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        return await asyncio.gather(*(one(s) for _ in range(n)))


async def test_sigterm_with_20_streams_in_flight(fake, tmp_path):
    port = free_port()
    proc = start(tmp_path, fake.url, port, SIDECAR_SERVER_DRAIN_GRACE="0.2", SIDECAR_SERVER_DRAIN_TIMEOUT="5")
    try:
        await wait_listening(port, proc)
        fake.script.chunks, fake.script.delay_chunks = 20, 0.05  # ~1 s per stream
        task = asyncio.create_task(stream_many(f"http://127.0.0.1:{port}", 20))
        while fake.in_flight < 20:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        results = await task
        rc = await asyncio.to_thread(proc.wait, 30)
        err = proc.stderr.read()
    finally:
        reap(proc)
    assert rc == 0, err
    assert all(status == 200 and body.endswith(b"data: [DONE]\n\n") for status, body in results)
    assert count_rows(tmp_path) == {"completed": 20}


async def test_sigkill_loses_nothing_with_the_spool(fake, tmp_path):
    port = free_port()
    # A long flush interval keeps rows only in the journal when the process is killed.
    proc = start(tmp_path, fake.url, port, SIDECAR_WRITER_FLUSH_INTERVAL_MS="60000")
    await wait_listening(port, proc)
    fake.script.chunks = 3
    results = await stream_many(f"http://127.0.0.1:{port}", 30)
    assert all(status == 200 and body.endswith(b"data: [DONE]\n\n") for status, body in results)
    # A stream's row is journaled before its last write: once a client has the whole answer, its row is on disk.
    # Killed at once, without waiting for anything.
    journal = Path(tmp_path, "spool")
    assert sum(p.read_bytes().count(b"\n") for p in journal.glob("requests.*.jsonl")) == 30
    reap(proc, 10)
    assert count_rows(tmp_path) == {}  # nothing reached the database before the kill
    port = free_port()
    proc = start(tmp_path, fake.url, port)  # the next start replays the spool
    try:
        await wait_listening(port, proc)
        deadline = time.monotonic() + 10
        while count_rows(tmp_path).get("completed", 0) < 30 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reap(proc)
    assert count_rows(tmp_path) == {"completed": 30}


@pytest.mark.parametrize("spool", ["true"])
async def test_sigkill_mid_load_keeps_the_database_sound(fake, tmp_path, spool):
    port = free_port()
    proc = start(tmp_path, fake.url, port, SIDECAR_WRITER_SPOOL=spool, SIDECAR_WRITER_FLUSH_INTERVAL_MS="5")
    await wait_listening(port, proc)
    fake.script.chunks, fake.script.delay_chunks = 5, 0.01
    load = asyncio.create_task(stream_many(f"http://127.0.0.1:{port}", 60))
    await asyncio.sleep(0.3)
    proc.kill()
    results = await load
    reap(proc, 10)
    served = sum(1 for status, body in results if status == 200 and body.endswith(b"[DONE]\n\n"))
    count_rows(tmp_path)  # integrity_check is ok
    port = free_port()
    proc = start(tmp_path, fake.url, port)
    try:
        await wait_listening(port, proc)
        await asyncio.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        reap(proc)
    rows = count_rows(tmp_path)
    assert rows.get("completed", 0) >= served  # every fully served request has its row after the restart
