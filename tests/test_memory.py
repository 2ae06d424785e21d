"""Bounded memory whatever one key sends or asks for: large non-streaming answers are relayed as they arrive
(usage read from the tail), audit keeps at most its payload cap of a body, a padded request cannot push its
prompt out of the audit record. Measured on a real `sidecar serve` process: its peak RSS (VmHWM)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.processes import reap
from tests.support.waits import free_port, wait_listening

MIB = 1024 * 1024


def big_embeddings(size: int) -> bytes:
    """An embeddings answer of `size` bytes: megabytes of floats, `usage` at the very end (as vLLM sends it)."""
    head = b'{"object":"list","model":"m","data":[{"object":"embedding","index":0,"embedding":['
    tail = b']}],"usage":{"prompt_tokens":7,"total_tokens":7}}'
    floats = b"0.0123456789," * ((size - len(head) - len(tail)) // 13)
    body = head + floats[:-1] + b"1" * (size - len(head) - len(tail) - len(floats) + 1) + tail
    assert len(body) == size
    orjson.loads(body)
    return body


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
async def test_sixteen_concurrent_64_mib_answers_keep_rss_under_200_mib(tmp_path):
    body = big_embeddings(64 * MIB)

    async def embeddings(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        view = memoryview(body)
        for at in range(0, len(body), MIB):
            await resp.write(view[at : at + MIB])
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=32 * MIB)
    app.router.add_post("/v1/embeddings", embeddings)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    port = free_port()
    env = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/s.db",
        "SIDECAR_UPSTREAM_URL": f"http://127.0.0.1:{upstream.port}/v1",
        "SIDECAR_AUTH_ENABLED": "false",
        "SIDECAR_AUDIT_CAPTURE": "all",
        "SIDECAR_SERVER_DRAIN_GRACE": "0",
        "SIDECAR_SERVER_ACCESS_LOG": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_listening(port, proc)
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"model": "m", "input": "warm"}) as r:
                assert r.status == 200
                await r.read()
            idle = peak_rss(proc.pid)

            async def one(i: int) -> tuple[int, int, bytes]:
                # one of them padded: 4 MiB of nothing beside its input
                doc = {"model": "m", "input": f"hello {i}", **({"pad": "x" * (4 * MIB)} if i == 0 else {})}
                size, tail = 0, b""
                payload = io.BytesIO(orjson.dumps(doc))
                async with s.post(url, data=payload, headers={"content-type": "application/json"}) as r:
                    async for chunk in r.content.iter_chunked(1 << 20):
                        size += len(chunk)
                        tail = (tail + chunk)[-200:]
                    return r.status, size, tail

            results = await asyncio.gather(*(one(i) for i in range(16)))
        peak = peak_rss(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
        reap(proc)
        await upstream.close()
    print(f"sidecar RSS: {idle / MIB:.0f} MiB after warm-up, peak {peak / MIB:.0f} MiB over 16 x 64 MiB answers")
    assert all(
        status == 200 and size == 64 * MIB and tail.endswith(b'"total_tokens":7}}') for status, size, tail in results
    )
    assert peak < 200 * MIB, f"peak RSS {peak / MIB:.0f} MiB"
    assert proc.returncode == 0, err[-2000:]
    # usage came from the tail of each relayed body
    import sqlite3

    with sqlite3.connect(tmp_path / "s.db") as db:
        rows = db.execute(
            "SELECT prompt_tokens, usage_source, bytes_out FROM request_log WHERE path = '/v1/embeddings'"
        )
        rows = rows.fetchall()
    assert len(rows) == 17 and all(r == (7, "upstream", 64 * MIB) for r in rows[1:] if r[2] > 1000)
    # audit: each record within the cap; the padded request still shows its input, its pad cut with a hash
    records = [orjson.loads(line) for p in (tmp_path / "audit").glob("*.jsonl") for line in p.read_bytes().splitlines()]
    assert len(records) == 17
    assert all(len(orjson.dumps(r)) <= MIB + 4096 for r in records)
    big = [r for r in records if r["response"] and r["response"].get("truncated")]
    assert len(big) == 17 and all(
        r["response"]["length"] == 64 * MIB and len(r["response"]["sha256"]) == 64 for r in big
    )
    padded = next(r for r in records if r["request"]["body"] and "pad" in r["request"]["body"])
    assert padded["request"]["body"]["input"] == "hello 0"
    assert (
        padded["request"]["body"]["pad"]["truncated"] is True and padded["request"]["body"]["pad"]["length"] == 4 * MIB
    )
    assert padded["request"]["bytes"] > 4 * MIB and len(padded["request"]["sha256"]) == 64
