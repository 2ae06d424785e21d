"""Probes: `/healthz` (the process answers; never touches the upstream) and `/readyz` (ready for traffic)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sidecar.upstream import Upstream


@dataclass
class RunState:
    """Process-wide run state owned by the app: set by the drain logic, read by the probes and the proxy."""

    draining: bool = False


class Health:
    def __init__(self, upstream: Upstream, state: RunState) -> None:
        self.upstream = upstream
        self.state = state

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is turning; the upstream is deliberately not asked, so a slow
        # model load never makes the kubelet restart the sidecar.
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.state.draining:
            return web.json_response({"status": "draining"}, status=503)
        ok, reason = await self.upstream.healthy()
        if not ok:
            return web.json_response({"status": "not_ready", "reason": reason}, status=503)
        return web.json_response({"status": "ready"})
