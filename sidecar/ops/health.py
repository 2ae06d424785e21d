"""Probes: `/healthz` (the process answers; never touches the upstream) and `/readyz` (ready for traffic).

`/readyz` follows what serving needs, not the store's health: a store outage is ridden out (keys verified
within `auth.max_stale` keep working, rows spool to the journal), so it must not take every replica out of its
Service at once. Not ready: `draining`, `pepper` (a store that came back late holds another pepper's
fingerprint), `upstream` (not reachable), `records` (the store is down, as the probe's
ping or a writer sees it, and that writer's journal cannot take rows: failing or full). With `writer.spool` off
rows are held in memory up to `writer.queue_size` during an outage: the operator's choice, not a reason.
It says where records are going (`store`: ok or down, asked within `STORE_PING` seconds; `writers`: each
writer's store, journal, rows held in memory) and how the dispatch limit is set (`saturation`: `off`, `metrics`
from the engine's page, `fallback` to `limits.global_concurrency` when the page cannot be read: still ready);
error texts go to the log, never to the (unauthenticated) caller.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from sidecar.errors import Forbidden, NotFound
from sidecar.ops.peers import Peers
from sidecar.ops.state import RunState
from sidecar.records.record import new_request_id
from sidecar.store.base import Store, StoreError
from sidecar.upstream.server import Upstream
from sidecar.wire.headers import forwarded

log = logging.getLogger("sidecar.health")
STORE_PING = 0.5  # a probe never waits longer on the store (kubelet probes time out after a few seconds)


class Health:
    def __init__(
        self,
        upstream: Upstream,
        state: RunState,
        store: Store,
        writers: Callable[[], dict[str, dict[str, Any]]] = dict,
        in_flight: Callable[[], int] = int,
        operator: Callable[[web.Request], bool] = lambda request: False,
        saturation: Callable[[], str] = lambda: "off",
        peers: Peers | None = None,
    ) -> None:
        self.upstream = upstream
        self.state = state
        self.store = store
        self.writers = writers
        self.in_flight = in_flight
        self.operator = operator  # whether a request carries the admin token (a wrong one raises 401 or 429)
        self.saturation = saturation  # how the dispatch limit is set: off, metrics, fallback (never a reason)
        self.peers = peers  # workers: another's drain is trusted by their secret; worker 0's speaks for all
        self._last_reason = ""
        self._store_down = False

    async def healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop is turning; the upstream is deliberately not asked, so a slow
        # model load never makes the kubelet restart the sidecar.
        return _json({"status": "ok"}, 200)

    async def readyz(self, request: web.Request) -> web.Response:
        writers = self.writers()
        detail = {"store": await self._store(), "writers": writers, "saturation": self.saturation()}
        if self.state.draining:
            return _json({"status": "draining", **detail}, 503)
        if self.state.refused:  # e.g. the store's keys were hashed with another pepper: every key would be 401
            self._not_ready(self.state.refused, "the store refused this replica's configuration (see the log)")
            return _json({"status": "not_ready", "reason": self.state.refused, **detail}, 503)
        ok, reason = await self.upstream.healthy()
        if not ok:
            self._not_ready("upstream", reason)
            return _json({"status": "not_ready", "reason": "upstream", **detail}, 503)
        stuck = [
            name
            for name, w in writers.items()
            if w["journal"] in ("failing", "full") and (w["store"] == "down" or detail["store"] == "down")
        ]
        if stuck:
            self._not_ready("records", f"store down and journal {writers[stuck[0]]['journal']} ({stuck[0]})")
            return _json({"status": "not_ready", "reason": "records", **detail}, 503)
        self._last_reason = ""
        return _json({"status": "ready", **detail}, 200)

    async def drain(self, request: web.Request) -> web.Response:
        """`POST /drain` starts the drain SIGTERM would (readyz 503, grace, listener closed, in-flight requests
        finish) without ending the process; `GET` only reports. For vLLM's preStop in the same pod: a native
        sidecar gets SIGTERM only after vLLM has exited, too late to drain the streams vLLM serves. Anyone else
        could take the replica out of service for good: served to a loopback peer that is not a proxy passing a
        client's request on (a proxy in the pod or on the host is loopback too, and says whose request it is), or
        to whoever holds the admin token."""
        peer = self.peers is not None and self.peers.trusted(request.headers)
        if not (peer or self.operator(request) or (_loopback(request) and not forwarded(request.headers))):
            raise Forbidden(
                "/drain is served on loopback to a request that did not come through a proxy, or with the admin token.",
                code="loopback_only",
            )
        if request.method == "POST":
            self.state.request_drain()
        doc = {"draining": self.state.draining, "drained": self.state.drained, "in_flight": self.in_flight()}
        if self.peers is not None:
            doc = await self.peers.drain(doc, start=request.method == "POST")
        return _json(doc, 200)

    async def _store(self) -> str:
        try:
            await asyncio.wait_for(self.store.ping(), STORE_PING)
        except (StoreError, TimeoutError) as exc:
            self._store_log(f"{type(exc).__name__}: {exc}")
            return "down"
        self._store_log("")
        return "ok"

    def _store_log(self, error: str) -> None:
        """The store's state changes logged once each (probes come every few seconds)."""
        if bool(error) != self._store_down:
            self._store_down = bool(error)
            if error:
                fields = {"detail": error[:300]}
                log.warning("store unreachable (still ready: keys are cached, rows spool)", extra={"fields": fields})
            else:
                log.info("store reachable")

    def _not_ready(self, what: str, detail: str) -> None:
        """Logged once per change of reason (probes come every few seconds)."""
        if detail != self._last_reason:
            self._last_reason = detail
            log.warning("not ready", extra={"fields": {"reason": what, "detail": detail[:300]}})


async def not_found(request: web.Request) -> web.Response:
    """Anything else on the operations port: it never relays."""
    raise NotFound(f"Unknown path {request.path[:200]!r} on the operations port.", code="unknown_url")


def _loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    try:
        address = ipaddress.ip_address(peer[0]) if peer is not None else None
    except ValueError:  # a Unix socket's peer name is no address
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1
    return address is not None and address.is_loopback


def _json(doc: dict[str, Any], status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc),
        status=status,
        headers={"content-type": "application/json", "x-request-id": new_request_id()},
    )
