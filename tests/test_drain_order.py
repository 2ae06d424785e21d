"""The pod's stop order in mode `vllm`, with real processes: vLLM's preStop (the command the chart renders) makes
the sidecar drain before vLLM gets SIGTERM, so streams in flight end whole. Kubernetes' order for a native
sidecar: preStop of the main container (vLLM), SIGTERM to it, its exit; only then the sidecar's SIGTERM.
Without that preStop the same order cuts the streams: the second test shows the hazard the hook removes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.support.clients import stream
from tests.support.helm import CHART
from tests.support.processes import count_rows, reap, start
from tests.support.waits import free_port, wait_listening

STREAM = '{"chunks": 30, "delay_chunks": 0.1}'  # 3 s: longer than the drain grace, shorter than its timeout
DRAIN = {"SIDECAR_SERVER_DRAIN_GRACE": "1", "SIDECAR_SERVER_DRAIN_TIMEOUT": "20"}


def rendered_prestop(helm_bin: str, ops_port: int) -> list[str]:
    """vLLM's preStop command exactly as the chart renders it (only `python3` becomes this interpreter)."""
    values = ["--set", "secrets.pepper=p" * 20, "--set", f"sidecar.opsPort={ops_port}"]
    values += ["--set", "sidecar.drainGrace=1", "--set", "sidecar.drainTimeout=20"]
    out = subprocess.run(
        [helm_bin, "template", "t", str(CHART), *values], capture_output=True, text=True, timeout=120, check=True
    )
    (deploy,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    (vllm,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    command = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python3" and command[-2] == str(ops_port) and float(command[-1]) >= 1 + 20
    return [sys.executable, *command[1:]]


class Pod:
    """A fake vLLM process and a sidecar process in front of it, as the chart lays them out."""

    def __init__(self, tmp_path) -> None:
        self.vllm_port, self.port, self.ops_port = free_port(), free_port(), free_port()
        self.vllm = subprocess.Popen(
            [sys.executable, "-m", "tests.support.upstream_process", str(self.vllm_port)],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        upstream = f"http://127.0.0.1:{self.vllm_port}/v1"
        self.sidecar = start(tmp_path, upstream, self.port, SIDECAR_SERVER_OPS_PORT=str(self.ops_port), **DRAIN)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        await wait_listening(self.vllm_port, self.vllm)
        await wait_listening(self.port, self.sidecar)

    def close(self) -> None:
        reap(self.vllm)
        reap(self.sidecar)


async def stop_in_kubernetes_order(pod: Pod, prestop: list[str] | None) -> float | None:
    """preStop of vLLM (when there is one), SIGTERM vLLM, wait for it, then SIGTERM the sidecar.
    Returns when the preStop ended (monotonic), or None."""
    hook_done = None
    if prestop is not None:
        hook = await asyncio.create_subprocess_exec(*prestop, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(hook.communicate(), 60)
        hook_done = time.monotonic()
        assert hook.returncode == 0, err
        assert b'"drained": true' in err, err  # it says what it waited for
    pod.vllm.send_signal(signal.SIGTERM)
    await asyncio.to_thread(pod.vllm.wait, 10)
    pod.sidecar.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(pod.sidecar.wait, 10) == 0
    return hook_done


async def test_vllm_prestop_lets_the_sidecar_drain_first(helm, tmp_path):
    pod = Pod(tmp_path)
    try:
        prestop = rendered_prestop(helm, pod.ops_port)
        await pod.ready()
        streams = [asyncio.create_task(stream(pod.url, STREAM)) for _ in range(3)]
        await asyncio.sleep(0.5)  # all three are streaming
        stopping = asyncio.create_task(stop_in_kubernetes_order(pod, prestop))
        await asyncio.sleep(0.3)  # the hook has asked for the drain; within the grace a new request still works
        late = await stream(pod.url, '{"chunks": 2}')
        results = await asyncio.gather(*streams)
        streams_done = time.monotonic()
        hook_done = await stopping
    finally:
        pod.close()
    assert late[0] == 200 and late[1].endswith(b"data: [DONE]\n\n")
    for code, body in results:
        assert code == 200 and body.endswith(b"data: [DONE]\n\n") and body.count(b'"content"') >= 30
    assert hook_done is not None and hook_done >= streams_done  # vLLM was signalled only after the streams ended
    assert count_rows(tmp_path) == {"completed": 4}


async def test_without_the_prestop_the_same_order_cuts_streams(tmp_path):
    pod = Pod(tmp_path)
    try:
        await pod.ready()
        streams = [asyncio.create_task(stream(pod.url, STREAM)) for _ in range(2)]
        await asyncio.sleep(0.5)
        await stop_in_kubernetes_order(pod, None)
        results = await asyncio.gather(*streams)
    finally:
        pod.close()
    for code, body in results:
        assert code in (0, 200) and b"data: [DONE]" not in body
    rows = count_rows(tmp_path)
    assert sum(rows.values()) == 2 and "completed" not in rows


@pytest.fixture(autouse=True)
def _proxy_env(monkeypatch):
    """vLLM pods often set HTTP(S)_PROXY to download models: the hook must not send loopback through it."""
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
