"""`sidecar serve` as a real process: demo upstream, the printed curl line works, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys

import aiohttp

from tests.conftest import free_port


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("sidecar did not start")


async def test_serve_with_demo_upstream_and_sigterm(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/s.db",
        "SIDECAR_SERVER_DRAIN_GRACE": "0",
    }
    env.pop("SIDECAR_UPSTREAM_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        await wait_listening(port, proc)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "hello there"}], "stream": True},
            ) as r:
                body = await r.read()
            assert r.status == 200 and body.endswith(b"data: [DONE]\n\n") and b" there" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, out[1]
    stderr = out[1]
    curl = next(line for line in stderr.splitlines() if line.startswith("try:  curl"))
    assert "no upstream configured" in stderr and '"msg":"listening"' in stderr
    args = shlex.split(curl[len("try:  ") :])
    assert args[0] == "curl" and f"http://127.0.0.1:{port}/v1/chat/completions" in args
    assert '"msg":"request"' in stderr and '"outcome":"completed"' in stderr
