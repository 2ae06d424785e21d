"""llama.cpp's llama-server with the tiny random-weight model of `scripts/real-upstream.sh` (built into a cache
outside the repo), started for the real-upstream tests (`LlamaServer`; the `llama` fixture of
`tests/support/fixtures.py` starts one per test module, and skips, or fails when SIDECAR_REAL_UPSTREAM=required,
when it is not built)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.processes import terminate
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
        terminate(self.proc)
        self._log.close()
