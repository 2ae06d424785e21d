"""`sidecar serve` as a real process: demo upstream, the printed curl line works, SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys

import aiohttp
import orjson

from tests.support.waits import free_port, wait_listening


async def test_serve_with_demo_upstream_and_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "SIDECAR_SERVER_DRAIN_GRACE": "0"}
    for name in ("SIDECAR_UPSTREAM_URL", "SIDECAR_STORE_URL", "SIDECAR_SERVER_DATA_DIR"):
        env.pop(name, None)
    proc = subprocess.Popen(  # the demo runs with the default store only: ./data/sidecar.db, here in tmp_path
        [sys.executable, "-m", "sidecar", "serve", "--demo", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        await wait_listening(port, proc)
        while not any(line.startswith("try:  curl") for line in lines):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 20)
            assert line, "sidecar exited before printing the curl line"
            lines.append(line)
        # Do what the printed curl line says: same URL, headers and body.
        args = shlex.split(next(line for line in lines if line.startswith("try:  curl"))[len("try:  ") :])
        headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
        data = args[args.index("-d") + 1]
        url = next(a for a in args if a.startswith("http"))
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=data, headers=headers) as r:
                body = await r.json()
            assert r.status == 200 and body["choices"][0]["message"]["content"] == "You said: hello there"
            stream = {**orjson.loads(data), "stream": True}
            async with s.post(url, json=stream, headers=headers) as r:
                raw = await r.read()
            assert r.status == 200 and raw.endswith(b"data: [DONE]\n\n") and b" there" in raw
    finally:
        proc.send_signal(signal.SIGTERM)
        out = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, out[1]
    stderr = "".join(lines) + out[1]
    assert "--demo: serving the bundled demo upstream" in stderr and '"msg":"listening"' in stderr
    assert headers["authorization"].split()[1] not in out[1]  # the demo key is printed once, never logged
    assert args[0] == "curl" and f"http://127.0.0.1:{port}/v1/chat/completions" in args
    assert '"request_id":"req_' in stderr and '"outcome":"completed"' in stderr
