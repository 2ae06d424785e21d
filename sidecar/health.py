"""Probes: `/healthz` (the process answers; never touches the upstream) and `/readyz` (ready for traffic).

`/readyz` says why it is not ready in a word (`store`, `upstream`, `draining`) and where records are going
(`writers`: the store up or down, the journal ok, failing or full, rows held in memory); error texts go to
the log, never to the (unauthenticated) caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from sidecar.records import new_request_id
from sidecar.state import RunState
from sidecar.store.base import Store, StoreError
from sidecar.upstream import Upstream

log = logging.getLogger("sidecar.health")


class Health:
    def __init__(
        self,
        upstream: Upstream,
        state: RunState,
        store: Store,
        writers: Callable[[], dict[str, dict[str, Any]]] = dict,
    ) -> None:
        self.upstream = upstream
        self.state = state
        self.store = store
        self.writers = writers
        self._last_reason = ""

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is turning; the upstream is deliberately not asked, so a slow
        # model load never makes the kubelet restart the sidecar.
        return _json({"status": "ok"}, 200)

    async def readyz(self, request: web.Request) -> web.Response:
        writers = self.writers()
        if self.state.draining:
            return _json({"status": "draining", "writers": writers}, 503)
        try:
            await self.store.ping()
        except StoreError as exc:
            self._not_ready("store", str(exc))
            return _json({"status": "not_ready", "reason": "store", "writers": writers}, 503)
        ok, reason = await self.upstream.healthy()
        if not ok:
            self._not_ready("upstream", reason)
            return _json({"status": "not_ready", "reason": "upstream", "writers": writers}, 503)
        self._last_reason = ""
        return _json({"status": "ready", "writers": writers}, 200)

    def _not_ready(self, what: str, detail: str) -> None:
        """Logged once per change of reason (probes come every few seconds)."""
        if detail != self._last_reason:
            self._last_reason = detail
            log.warning("not ready", extra={"fields": {"reason": what, "detail": detail[:300]}})


def _json(doc: dict[str, Any], status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        status=status,
        headers={"content-type": "application/json", "x-request-id": new_request_id()},
    )
