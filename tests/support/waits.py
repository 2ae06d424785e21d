"""Waits: for a condition (`wait_for`), for a process to listen (`wait_listening`), and a free port to listen on."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Callable


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
