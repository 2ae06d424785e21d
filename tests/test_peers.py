"""Worker 0's view of the pod (`sidecar.ops.peers`): a worker's page labelled with its index, the pages merged
family by family into one page Prometheus's own parser reads back whole; the workers' secret."""

from __future__ import annotations

import socket

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.ops.peers import Peers, Worker, labelled, loopback, merged
from tests.support.waits import free_port


def page(requests: float, extra: bool = False) -> bytes:
    registry = CollectorRegistry()
    Counter("sidecar_requests", "Requests.", ("route",), registry=registry).labels('/v1/a "b"').inc(requests)
    Histogram("sidecar_latency_seconds", "Latency.", registry=registry, buckets=(0.1, 1.0)).observe(0.5)
    Gauge("sidecar_in_flight", "In flight.", registry=registry).set(requests)
    if extra:
        Gauge("sidecar_only_here", "Only on one worker.", registry=registry).set(1)
    return generate_latest(registry)


def samples(text: bytes) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text.decode()) for s in f.samples]


def test_every_sample_of_a_page_gets_the_worker_label_and_keeps_its_own():
    text = page(3)
    before, after = samples(text), samples(labelled(text, 7))
    assert after == [(name, {"worker": "7", **labels}, value) for name, labels, value in before]
    assert ("sidecar_requests_total", {"worker": "7", "route": '/v1/a "b"'}, 3.0) in after  # escapes kept
    assert ("sidecar_in_flight", {"worker": "7"}, 3.0) in after  # a sample without labels gets braces


def test_pages_merge_family_by_family():
    text = merged([labelled(page(3), 0), labelled(page(5, extra=True), 1)])
    families = list(text_string_to_metric_families(text.decode()))
    assert [f.name for f in families] == [
        "sidecar_requests", "sidecar_requests_created", "sidecar_latency_seconds", "sidecar_latency_seconds_created",
        "sidecar_in_flight", "sidecar_only_here",
    ]  # fmt: skip
    assert text.count(b"# TYPE sidecar_requests_total counter") == 1
    counts = {s.labels["worker"]: s.value for s in families[0].samples if s.name == "sidecar_requests_total"}
    assert counts == {"0": 3.0, "1": 5.0}
    buckets = [s for s in families[2].samples if s.name == "sidecar_latency_seconds_bucket"]
    assert len(buckets) == 6  # three buckets (+Inf) per worker


def test_a_peer_is_trusted_by_the_shared_secret_only():
    peers = Peers(Worker(1, "s3cret-value"), 2, "0.0.0.0", 9000)
    assert peers.trusted({"x-sidecar-peer": "s3cret-value"})
    assert not peers.trusted({"x-sidecar-peer": "s3cret-valuf"}) and not peers.trusted({})
    assert "s3cret" not in repr(peers.worker)  # never in a log line or a traceback
    assert not peers.speaks_for_pod and Peers(Worker(0, "x"), 2, "::", 9000).speaks_for_pod
    assert not Peers(Worker(0, "x"), 2, "::", 0).speaks_for_pod  # no operations port: nothing to reach them at


def test_the_other_workers_are_reached_on_loopback_when_listening_everywhere():
    assert [loopback(h) for h in ("0.0.0.0", "::", "0.0.0.0,::", "10.1.2.3", "127.0.0.1")] == [
        "127.0.0.1", "::1", "127.0.0.1", "10.1.2.3", "127.0.0.1",
    ]  # fmt: skip


def test_a_header_that_is_not_utf8_is_no_peer_and_no_error():
    peers = Peers(Worker(1, "s3cret-value"), 2, "0.0.0.0", 9000)
    assert not peers.trusted({"x-sidecar-peer": b"\xff\xfe".decode("utf-8", "surrogateescape")})


async def test_a_closed_port_is_a_drained_worker_only_once_it_was_seen_draining():
    """Worker 0's drain state for the pod: another worker whose operations port refuses the connection has finished
    if it answered draining before; if it never did, it has not started yet (or is being started again) and the
    pod is not drained, so vLLM's preStop keeps waiting."""
    base = next(p for p in (free_port() for _ in range(50)) if _free(p + 1))
    peers = Peers(Worker(0, "s3cret-value"), 2, "127.0.0.1", base)
    own = {"draining": True, "drained": True, "in_flight": 0}
    state = await peers.drain(own, start=True)  # worker 1 not listening yet
    assert state["workers"]["1"] == {"gone": True, "draining": False, "drained": False}
    assert (state["draining"], state["drained"]) == (False, False)

    asked: list[str] = []

    async def drain(request: web.Request) -> web.Response:
        asked.append(request.headers.get("x-sidecar-peer", ""))
        return web.json_response({"draining": True, "drained": False, "in_flight": 2})

    app = web.Application()
    app.router.add_route("*", "/drain", drain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", base + 1)
    await site.start()
    try:
        state = await peers.drain(own, start=True)
        assert (state["draining"], state["drained"], state["in_flight"]) == (True, False, 2)
        assert asked == ["s3cret-value"]  # asked with the workers' secret
    finally:
        await runner.cleanup()
    state = await peers.drain(own, start=True)  # its port closed after it was seen draining: it finished
    assert state["workers"]["1"] == {"gone": True, "draining": True, "drained": True}
    assert (state["draining"], state["drained"], state["in_flight"]) == (True, True, 0)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
