"""Graceful drain on SIGTERM, and the Dockerfile's lint."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp

from tests.support.bodies import STREAM
from tests.support.clients import stream
from tests.support.processes import count_rows, reap, start
from tests.support.waits import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent


async def test_sigterm_drains_short_streams_and_ends_long_ones(fake, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, fake.url, port, SIDECAR_SERVER_DRAIN_GRACE="1", SIDECAR_SERVER_DRAIN_TIMEOUT="2")
    try:
        await wait_listening(port, proc)
        short = [asyncio.create_task(stream(url, '{"chunks": 10, "delay_chunks": 0.1}')) for _ in range(3)]
        long = [asyncio.create_task(stream(url, '{"chunks": 200, "delay_chunks": 0.05}')) for _ in range(2)]
        while fake.in_flight < 5:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with aiohttp.ClientSession() as s:
            while True:  # the signal reaches the process asynchronously: readyz must turn within a moment
                async with s.get(url + "/readyz") as r:
                    if r.status == 503:
                        assert (await r.json())["status"] == "draining"
                        break
                assert time.monotonic() - signalled < 0.2, "readyz still 200 0.2 s after SIGTERM"
                await asyncio.sleep(0.005)
            async with s.post(url + "/v1/chat/completions", json={**STREAM, "stream": False}) as r:
                assert r.status == 200  # a new request during the grace period is still served
        short_results = await asyncio.gather(*short)
        long_results = await asyncio.gather(*long)
        rc = await asyncio.to_thread(proc.wait, 30)
    finally:
        reap(proc)
    assert rc == 0
    for status, body in short_results:
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    for status, body in long_results:
        assert status == 200 and b"[DONE]" not in body
        assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error") and b"server_shutting_down" in body
    assert count_rows(tmp_path) == {"completed": 4, "shutdown": 2}


async def test_second_signal_shortens_the_wait(fake, tmp_path):
    port = free_port()
    proc = start(tmp_path, fake.url, port, SIDECAR_SERVER_DRAIN_GRACE="30", SIDECAR_SERVER_DRAIN_TIMEOUT="60")
    try:
        await wait_listening(port, proc)
        task = asyncio.create_task(stream(f"http://127.0.0.1:{port}", '{"chunks": 500, "delay_chunks": 0.05}'))
        while fake.in_flight < 1:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = await asyncio.to_thread(proc.wait, 30)
        assert rc == 0 and time.monotonic() - started < 8
        _status, body = await task
        assert b"server_shutting_down" in body
    finally:
        reap(proc)
    assert count_rows(tmp_path) == {"shutdown": 1}
