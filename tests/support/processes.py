"""Processes a test starts: the sidecar as its own process (`start`), the CLI (`cli`), and `reap` to end one
without leaks; `count_rows` reads what a process stored."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from typing import Any


def reap(proc: Any, timeout: float = 30) -> int:
    """End a test's subprocess if it still runs, wait for it, and close its pipes (no ResourceWarning)."""
    if proc.poll() is None:
        proc.kill()
    rc = int(proc.wait(timeout))
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return rc


def terminate(proc: Any, timeout: float = 10) -> None:
    """Ask a server process to stop (SIGTERM), and kill it if it has not within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start(tmp_path, upstream, port, **env):
    full = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/p.db",
        "SIDECAR_UPSTREAM_URL": upstream,
        "SIDECAR_AUTH_ENABLED": "false",
        "SIDECAR_SERVER_ACCESS_LOG": "false",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(port)],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def count_rows(tmp_path):
    with sqlite3.connect(tmp_path / "p.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return dict(conn.execute("SELECT outcome, COUNT(*) FROM request_log GROUP BY outcome").fetchall())


def cli(data_dir, *args, db=None, **env):
    full = {**os.environ, "SIDECAR_SERVER_DATA_DIR": str(data_dir), **env}
    full.pop("SIDECAR_STORE_URL", None)
    if db is not None:
        full["SIDECAR_STORE_URL"] = db
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], env=full, capture_output=True, text=True, timeout=60
    )
