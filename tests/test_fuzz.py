"""Generated hostile input end to end: hypothesis bodies on every proxied route, and 10,000 random paths and model
names against the metrics' cardinality.

Hypothesis drives plain functions, so the fake upstream and the sidecar run on their own uvloop in a thread, and
requests go over real sockets with http.client. After the run: no 5xx, the writer alive, one stored row per
request, no lease left.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import string
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import LIMITS, PROXY, STORE, WRITER
from sidecar.runner import Server
from sidecar.store.base import RequestQuery
from tests.support.fake_upstream import FakeUpstream
from tests.support.sidecars import make_settings

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


@dataclass
class Threaded:
    """The fake upstream and a sidecar on a uvloop running in a thread of their own."""

    tmp: Path
    loop: asyncio.AbstractEventLoop = field(init=False)
    port: int = 0
    sent: int = 0
    _thread: threading.Thread = field(init=False)

    def start(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start())

    def call(self, coro: Any, timeout: float = 60) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    async def _start(self) -> None:
        self.fake = FakeUpstream()
        self.fake_server = TestServer(self.fake.app(), host="127.0.0.1")
        await self.fake_server.start_server()
        url = f"http://127.0.0.1:{self.fake_server.port}/v1"
        self.server = Server(make_settings(url, self.tmp, server__max_body_bytes=200_000))
        await self.server.start()
        self.port = self.server.port

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, Any] | None = None) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            resp.read()
            self.sent += 1
            return resp.status
        finally:
            conn.close()

    def stop(self) -> None:
        async def _stop() -> None:
            await self.server.runner.cleanup()
            await self.fake_server.close()

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def threaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Threaded]:
    t = Threaded(tmp_path_factory.mktemp("fuzz"))
    t.start()
    yield t
    t.stop()


def check_after(t: Threaded) -> None:
    """What must hold after any amount of hostile input: writer alive, leases empty, a row per request."""

    async def state() -> tuple[bool, tuple[int, int], int, int]:
        app = t.server.app
        proxy = app[PROXY]
        assert proxy.rejects is not None
        expected = t.sent - proxy.rejects.skipped  # unauthenticated 404s past the per-source rate get no row
        for _ in range(500):
            if not proxy.in_flight.tasks:
                break
            await asyncio.sleep(0.01)
        writer = app[WRITER]
        for _ in range(500):
            rows = len(await app[STORE].requests(RequestQuery(limit=1_000_000)))
            if rows >= expected:
                break
            await asyncio.sleep(0.02)
        return writer.alive, app[LIMITS].local.totals(), rows - expected, len(proxy.in_flight.tasks)

    alive, leases, missing, active = t.call(state())
    assert alive, "the writer died"
    assert leases == (0, 0)
    assert active == 0
    assert missing == 0, f"{t.sent} requests, {missing} rows more or fewer than expected"


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities included: they are written as NaN / Infinity below
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
field_values = {
    "model": st.text(max_size=40) | json_values,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "x"]), "content": st.text(max_size=50) | json_values}
        ),
        max_size=3,
    )
    | json_values,
    "prompt": st.text(max_size=50) | json_values,
    "input": st.text(max_size=50) | json_values,
    "stream": st.booleans() | json_values,
    "max_tokens": st.sampled_from([-1, 0, 1, 16, 2**63, "300", True, None, 1.5]) | st.floats() | json_values,
    "max_completion_tokens": st.integers() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": json_values}) | json_values,
    "store": json_values,
}
documents = st.dictionaries(st.sampled_from(sorted(field_values)), json_values, max_size=3).flatmap(
    lambda extra: st.fixed_dictionaries({}, optional={k: v for k, v in field_values.items()}).map(
        lambda d: {**extra, **d}
    )
)


def encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN, Infinity: what a sloppy client sends


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            ["document", "any json", "duplicate keys", "deep", "bad utf-8", "lone surrogate", "big number", "truncated"]
        )
    )
    if kind == "document":
        return encode(draw(documents))
    if kind == "any json":
        return encode(draw(json_values))
    if kind == "duplicate keys":
        doc = draw(documents)
        key = draw(st.sampled_from(sorted(field_values)))
        return (
            encode(doc)[:-1].rstrip(b"}")
            + (b"," if doc else b"")
            + b'"%s": 1, "%s": "x"}' % (key.encode(), key.encode())
        )
    if kind == "deep":
        depth = draw(st.integers(min_value=50, max_value=5000))
        return b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bad utf-8":
        raw = bytearray(encode(draw(documents)))
        raw.insert(draw(st.integers(0, len(raw))), draw(st.sampled_from([0xFF, 0xC0, 0x80, 0xED])))
        return bytes(raw)
    if kind == "lone surrogate":
        return b'{"model": "m\\ud800", "messages": [{"role": "user", "content": "\\udfff x"}]}'
    if kind == "big number":
        return b'{"model": "m", "messages": [], "max_tokens": 1e400, "n": -1e400, "x": 123456789012345678901234567890}'
    raw = encode(draw(documents))
    return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]


header_values = st.lists(st.sampled_from([*range(0x20, 0x7F), *range(0x80, 0x100), 0x09]), max_size=24).map(bytes)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(route=st.sampled_from(ROUTES), body=hostile_bodies(), header=header_values)
def test_hostile_bodies_on_every_route_never_get_a_5xx(threaded, route, body, header):
    status = threaded.request("POST", route, body, {"x-fuzz": header})
    assert status < 500, (route, body[:300], header, status)


def test_after_the_fuzzing_the_writer_is_alive_and_every_request_has_a_row(threaded):
    assert threaded.sent > 0
    check_after(threaded)


def test_random_paths_and_model_names_keep_metrics_bounded(threaded):
    rng = random.Random(20261123)

    def series() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", threaded.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    def word(n: int) -> str:
        return "".join(rng.choice(string.ascii_letters + string.digits + "-_.%~") for _ in range(n))

    names: list[str] = []
    counts = []
    conn = http.client.HTTPConnection("127.0.0.1", threaded.port, timeout=30)
    for i in range(10_000):
        if i in (1_000, 5_000):
            counts.append(series())
        name = word(rng.randint(1, 60))
        names.append(name)
        if i % 2:
            path, body = "/v1/" + name, b"{}"
        else:
            path, body = rng.choice(ROUTES), orjson.dumps({"model": name, "messages": [], "input": "x", "prompt": "x"})
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        threaded.sent += 1
        assert resp.status < 500
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", threaded.port, timeout=30)
    conn.close()
    counts.append(series())
    print(f"\n/metrics series after 1,000 / 5,000 / 10,000 random paths and model names: {counts}")
    assert counts[0] == counts[1] == counts[2], "the number of series keeps growing with new paths or models"
    assert counts[2] < 500  # bounded by the routes, keys and classes the config knows, not by what clients send
    conn = http.client.HTTPConnection("127.0.0.1", threaded.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert not [n for n in names if len(n) > 6 and n in text], "a client-chosen path or model became a label"
    check_after(threaded)
