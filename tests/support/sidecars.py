"""A sidecar in the test's own event loop: its settings (`make_settings`), what a test holds of it (`Running`)
and the log lines it emits (`RecordCatcher`). The fixtures that start them are in `tests/conftest.py`."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.config import Settings, load
from sidecar.ops.logs import REQUEST_LOGGER
from sidecar.runner import Server


class RecordCatcher(logging.Handler):
    """Collects the structured request log lines the sidecar emits (its real output path)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.tracebacks: list[str] = []  # aiohttp's "Error handling request": a handler raised, a defect

    def emit(self, record: logging.LogRecord) -> None:
        fields = record.__dict__.get("fields")
        if record.name == REQUEST_LOGGER and isinstance(fields, dict):
            self.rows.append(dict(fields))
        self.lines.append(self.format(record) + repr(record.__dict__.get("fields")))
        if record.name.startswith("aiohttp") and record.exc_info and record.levelno >= logging.ERROR:
            self.tracebacks.append(self.format(record) + "\n" + logging.Formatter().formatException(record.exc_info))


def make_settings(upstream_url: str, tmp_path: Any, **options: Any) -> Settings:
    flags = {
        "upstream.url": upstream_url,
        "server.port": 0,
        "server.data_dir": str(tmp_path),
        "store.url": f"sqlite:///{tmp_path}/sidecar.db",
        "server.drain_grace": 0,
        "server.request_log": str(tmp_path / "requests.jsonl"),
        "server.log_flush_ms": 0,
        "auth.enabled": False,  # the relay tests; key and lease tests turn it on
        "writer.flush_interval_ms": 20,
    }
    flags.update({k.replace("__", "."): v for k, v in options.items()})
    return load(None, {}, flags)


@dataclass
class Running:
    server: Server
    url: str
    port: int
    catcher: RecordCatcher
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The request log lines written so far (the JSON lines the sidecar emits per request)."""
        path = self.server.settings.server.request_log
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return [orjson.loads(line) for line in f if line.strip()]

    async def stored(self, expect: int | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """request_log rows in the store, oldest first; waits until `expect` rows are there."""
        from sidecar.app import STORE
        from sidecar.store.base import RequestQuery, StoreError

        store = self.server.app[STORE]
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            try:
                rows = await store.requests(RequestQuery(limit=100000))
            except StoreError:  # a store coming back (the fault tests): ask again until the deadline
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.1)
                continue
            if expect is None or len(rows) >= expect or loop.time() > end:
                return sorted(rows, key=lambda r: r["started_at"])
            await asyncio.sleep(0.02)

    def log_text(self) -> str:
        """Everything the sidecar logged: request lines and other log records."""
        with open(self.server.settings.server.request_log) as f:
            return f.read() + "\n".join(self.catcher.lines)
