"""Opener: the store opened and migrated at start, or, when PostgreSQL does not answer yet, in the background.

A replica started during a store outage still serves: static keys verify, rows spool to the journal, and
`/readyz` reports the store down without failing. The store is opened (and migrated) as soon as it answers,
and the writer's probe then replays what spooled. SQLite is a file on this machine: if it cannot be opened
the configuration is wrong, and the process exits at once instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.store")
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between attempts, doubling


class Opener:
    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name  # the store's URL, masked
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self._open()
        except StoreError as exc:
            if not exc.transient or self.store.kind != "postgres":
                raise
            log.warning(
                "store unreachable at start: static keys verify, rows spool; opening it when it answers",
                extra={"fields": {"store": self.name, "error": str(exc)[:200]}},
            )
            self._task = asyncio.get_running_loop().create_task(self._retry())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    async def _open(self) -> None:
        try:
            await self.store.open()
            await self.store.migrate()
        except StoreError:
            await self.store.close()  # a pool opened before the migration failed: the next attempt opens anew
            raise

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self._open()
            except StoreError:
                delay = min(delay * 2, RETRY_MAX)
                continue
            log.info("store reachable: opened and migrated")
            return
