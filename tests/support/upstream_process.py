"""The fake upstream as a process of its own, standing in for vLLM where a test needs two processes (the drain
order of a pod). SIGTERM ends it at once, mid-stream: the worst a model server can do to the streams it serves.

    python -m tests.support.upstream_process PORT
"""

from __future__ import annotations

import os
import signal
import sys

from aiohttp import web

from tests.support.fake_upstream import FakeUpstream


def main() -> None:
    port = int(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    web.run_app(FakeUpstream().app(), host="127.0.0.1", port=port, access_log=None, handle_signals=False, print=None)


if __name__ == "__main__":
    main()
