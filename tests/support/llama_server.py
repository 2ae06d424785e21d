"""A real llama-server (llama.cpp) with the tiny random-weight model that `bash scripts/real-upstream.sh build`
puts in a cache outside the repo, for the `real_upstream` tests: `LlamaServer` runs one on a free port, and the
`llama` fixture (import `llama_server` into a test module) gives one per module, skipping when it is not built
(failing when SIDECAR_REAL_UPSTREAM=required)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.waits import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cache_dir() -> Path | None:
    done = subprocess.run(["bash", str(ROOT / "scripts/real-upstream.sh"), "path"], capture_output=True, text=True)
    return Path(done.stdout.strip()) if done.returncode == 0 else None


class LlamaServer:
    def __init__(self, cache: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                str(cache / "bin/llama-server"),
                *("-m", str(cache / "model.gguf"), "--alias", "tiny"),
                *("--host", "127.0.0.1", "--port", str(self.port)),
                *("-c", "8192", "-np", "2", "-t", "2", "--no-warmup", "--seed", "1", "--reranking"),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, "llama-server exited at start"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("llama-server did not become ready")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module", name="llama")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    cache = cache_dir()
    if cache is None:
        if os.environ.get("SIDECAR_REAL_UPSTREAM") == "required":
            pytest.fail("llama-server is not built (bash scripts/real-upstream.sh build)")
        pytest.skip("llama-server is not built: run `bash scripts/real-upstream.sh build` (about 5-15 min)")
    server = LlamaServer(cache, tmp_path_factory.mktemp("llama") / "llama-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
