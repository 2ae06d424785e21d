"""Opener: the store opened and migrated at start, or, when PostgreSQL does not answer yet, in the background.

A replica started during a store outage still serves: static keys verify, rows spool to the journal, and
`/readyz` reports the store down without failing. The store is opened (and migrated) as soon as it answers,
and the writer's probe then replays what spooled. SQLite is a file on this machine: if it cannot be opened
the configuration is wrong, and the process exits at once instead; so does a PostgreSQL that refuses the
credentials or the database, or that answers but cannot be migrated (a grant missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.store")
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between attempts, doubling


class Opener:
    def __init__(self, store: Store, name: str, check: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.name = name  # the store's URL, masked
        self.check = check  # run once the store is open and migrated (the pepper's fingerprint)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.store.open()
        except StoreError as exc:
            if not exc.transient or self.store.kind != "postgres":
                raise
            log.warning(
                "store unreachable at start: static keys verify, rows spool; opening it when it answers",
                extra={"fields": {"store": self.name, "error": str(exc)[:200]}},
            )
            self._task = asyncio.get_running_loop().create_task(self._retry())
            return
        await self._migrate()  # a store that answers but cannot be migrated (a grant missing) is a start error
        if self.check is not None:
            checked = False
            try:
                await self.check()
                checked = True
            finally:
                if not checked:  # refused (another pepper's store): the start fails, the store closes
                    await self.store.close()

    async def close(self) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self.store.close()

    async def _migrate(self) -> None:
        try:
            await self.store.migrate()
        except StoreError:
            await self.store.close()
            raise

    async def _retry(self) -> None:
        """Open and migrate until both succeed; each new reason it cannot is logged once (an error for one that
        will not pass by itself: credentials, a grant), so an operator sees why the store stays away."""
        delay, last = RETRY_FIRST, ""
        while True:
            await asyncio.sleep(delay)
            try:
                await self.store.open()
                await self._migrate()
            except StoreError as exc:
                reason = str(exc)[:200]
                if reason != last:
                    last = reason
                    level = logging.WARNING if exc.transient else logging.ERROR
                    log.log(level, "store still unavailable", extra={"fields": {"store": self.name, "error": reason}})
                delay = min(delay * 2, RETRY_MAX)
                continue
            except Exception:  # never die silently: the store would stay closed for the life of the process
                log.exception("opening the store failed; trying again", extra={"fields": {"store": self.name}})
                await self.store.close()
                delay = RETRY_MAX
                continue
            log.info("store reachable: opened and migrated", extra={"fields": {"store": self.name}})
            await self._late_check()
            return

    async def _late_check(self) -> None:
        """The start-up check of a store that came late. It can no longer stop the start: an error is logged
        (keys the store holds will not verify) and the store stays open, so rows are still written."""
        if self.check is None:
            return
        try:
            await self.check()
        except Exception as exc:
            log.error("store check failed: %s", exc, extra={"fields": {"store": self.name}})
