"""Probes: `/healthz` (the process answers; never touches the upstream) and `/readyz` (ready for traffic)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from sidecar.records import new_request_id
from sidecar.store.base import Store, StoreError
from sidecar.upstream import Upstream


@dataclass
class RunState:
    """Process-wide run state owned by the app: set by the drain logic, read by the probes and the proxy."""

    draining: bool = False


class Health:
    def __init__(self, upstream: Upstream, state: RunState, store: Store) -> None:
        self.upstream = upstream
        self.state = state
        self.store = store

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is turning; the upstream is deliberately not asked, so a slow
        # model load never makes the kubelet restart the sidecar.
        return _json({"status": "ok"}, 200)

    async def readyz(self, request: web.Request) -> web.Response:
        if self.state.draining:
            return _json({"status": "draining"}, 503)
        try:
            await self.store.ping()
        except StoreError as exc:
            return _json({"status": "not_ready", "reason": f"store: {exc}"}, 503)
        ok, reason = await self.upstream.healthy()
        if not ok:
            return _json({"status": "not_ready", "reason": reason}, 503)
        return _json({"status": "ready"}, 200)


def _json(doc: dict[str, str], status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        status=status,
        headers={"content-type": "application/json", "x-request-id": new_request_id()},
    )
