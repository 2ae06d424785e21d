"""Small helpers for tests: wait for a condition, a free port, reaping a subprocess."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 5.0, why: Callable[[], str] = lambda: "condition not met in time"
) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(why())
        await asyncio.sleep(0.01)
