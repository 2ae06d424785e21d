"""The suite itself: it runs on the event loop `sidecar serve` runs on."""

from __future__ import annotations

import asyncio


async def test_the_suite_runs_on_uvloop_like_sidecar_serve():
    import os

    loop = asyncio.get_running_loop()
    expected = "asyncio" if os.environ.get("SIDECAR_TEST_LOOP") == "asyncio" else "uvloop"
    assert type(loop).__module__.split(".")[0] == expected
