"""Request latency while the SQLite store is locked: p50/p99 over 10 s with and without an exclusive lock.

    .venv/bin/python bench/lock_bench.py [--seconds 10] [--conns 8]

Starts the repository's mock upstream (bench/mock_upstream.py) and the sidecar (auth off, records on, SQLite;
SIDECAR_BIN replaces .venv/bin/sidecar), then runs a closed-loop aiohttp client twice: once normally, once while
another process holds `BEGIN EXCLUSIVE` on the database for the whole window. Rows are counted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "mock", "messages": [{"role": "user", "content": "Hello"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def window(url: str, seconds: float, conns: int) -> list[float]:
    lat: list[float] = []
    end = time.monotonic() + seconds

    async def loop(s: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            async with s.post(url, json=BODY) as r:
                await r.read()
                assert r.status == 200
            lat.append((time.perf_counter() - t) * 1000)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(loop(s) for _ in range(conns)))
    return lat


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--conns", type=int, default=8)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "bench/mock_upstream.py"), "--port", str(mock_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(work),
        "SIDECAR_STORE_URL": f"sqlite:///{work}/s.db",
        "SIDECAR_AUTH_ENABLED": "false",
        "SIDECAR_SERVER_ACCESS_LOG": "false",
        "SIDECAR_SERVER_DRAIN_GRACE": "0",
        "SIDECAR_AUTH_PEPPER": secrets.token_hex(32),
    }
    sidecar = subprocess.Popen(
        [
            *shlex.split(os.environ.get("SIDECAR_BIN", str(ROOT / ".venv/bin/sidecar"))),
            "serve",
            "--port",
            str(port),
            "--upstream",
            f"http://127.0.0.1:{mock_port}/v1",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_port(mock_port)
        await wait_port(port)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        await window(url, 2, a.conns)  # warm-up
        free = await window(url, a.seconds, a.conns)
        locker = sqlite3.connect(work / "s.db", timeout=30, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        locked = await window(url, a.seconds, a.conns)
        locker.execute("ROLLBACK")
        locker.close()
        await asyncio.sleep(8)  # the writer retries, then replays the spool
        sent = len(free) + len(locked)
        with sqlite3.connect(work / "s.db") as conn:
            rows = conn.execute("SELECT COUNT(*) FROM request_log").fetchone()[0]
        for name, xs in (("unlocked", free), ("locked", locked)):
            print(f"{name:9s} n={len(xs):6d} p50={pct(xs, 50):6.2f} ms  p99={pct(xs, 99):6.2f} ms")
        print(
            f"p99 rise while locked: {pct(locked, 99) - pct(free, 99):+.2f} ms; rows {rows} (warm-up included) "
            f">= requests in windows {sent}"
        )
    finally:
        sidecar.terminate()
        mock.terminate()
        sidecar.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
