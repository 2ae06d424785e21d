"""A CloudEvents batch receiver on 127.0.0.1 (OpenMeter's ingest API in its shape): every event of a POSTed
`application/cloudevents-batch+json` array is parsed and validated by the `cloudevents` SDK (`parse`), its id
recorded. It can fail on demand (`fail_with` a status, `fail_for` that many POSTs) and tells what it got."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

BATCH = "application/cloudevents-batch+json"


def parse(item: Any) -> CloudEvent:
    """One structured event, parsed and validated by the SDK (required attributes, specversion, time)."""
    message = HTTPMessage(headers={"content-type": "application/cloudevents+json"}, body=orjson.dumps(item))
    event = from_http(message, JSONFormat(), CloudEvent)
    assert isinstance(event, CloudEvent)
    assert event.get_specversion() == "1.0" and isinstance(event.get_time(), datetime)
    assert event.get_time().tzinfo is not None and event.get_subject()
    assert isinstance(event.get_data(), dict)
    return event


class Receiver:
    def __init__(self) -> None:
        self.events: list[CloudEvent] = []
        self.posts = 0
        self.refused = 0  # POSTs answered with `fail_with`
        self.fail_with = 503
        self.fail_for = 0  # the next this many POSTs fail
        self.failing = False  # every POST fails while set
        self.retry_after = ""  # a Retry-After on failures, when set
        self.authorization: set[str | None] = set()
        self.invalid: list[str] = []
        self.url = ""
        self._server: TestServer | None = None

    @property
    def ids(self) -> list[str]:
        return [str(e.get_id()) for e in self.events]

    def repeats(self) -> int:
        return sum(n - 1 for n in Counter(self.ids).values())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/events", self.handle)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self.url = f"http://127.0.0.1:{self._server.port}/api/v1/events"

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.authorization.add(request.headers.get("Authorization"))
        if self.failing or self.fail_for > 0:
            self.fail_for = max(0, self.fail_for - 1)
            self.refused += 1
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({"error": "not now"}, status=self.fail_with, headers=headers)
        if request.content_type != BATCH:
            self.invalid.append(f"content type {request.content_type}")
            return web.json_response({"error": "not a batch"}, status=415)
        items = orjson.loads(await request.read())
        try:
            assert isinstance(items, list) and items
            parsed = [parse(item) for item in items]
        except Exception as exc:  # the SDK's validation errors, or ours: answered as OpenMeter would
            self.invalid.append(repr(exc))
            return web.json_response({"error": repr(exc)}, status=400)
        self.events.extend(parsed)
        return web.Response(status=204)
