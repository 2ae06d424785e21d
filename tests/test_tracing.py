"""Traces (#18): one server span per proxied request, exported over OTLP/HTTP to a real receiver started here
(tests/support/otlp_receiver.py decodes the protobuf the SDK really sends), continuing a client's `traceparent` and
handing the sidecar's own context to the upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import aiohttp
import pytest

from tests.support.clients import ADMIN, admin
from tests.support.processes import reap, start
from tests.support.waits import free_port, wait_listening

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CLIENT_PARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SERVER, ERROR = 2, 2  # SPAN_KIND_SERVER, STATUS_CODE_ERROR in OTLP
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


@pytest.fixture
async def traced(fake, sidecar_factory, receiver):
    async def start(**options):
        running = await sidecar_factory(
            fake.url,
            auth__enabled=True,
            server__admin_token=ADMIN,
            tracing__enabled=True,
            tracing__endpoint=receiver.url,
            tracing__export_delay=0.05,
            **options,
        )
        async with aiohttp.ClientSession() as s:
            _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "traced"})
        return running, created["key"], created["id"]

    return start


async def post(url, key, body, headers=None):
    async with aiohttp.ClientSession() as s:
        hdrs = {"authorization": f"Bearer {key}", **(headers or {})}
        async with s.post(url + "/v1/chat/completions", json=body, headers=hdrs) as r:
            return r.status, r.headers, await r.read()


def only(spans, request_id):
    found = [s for s in spans if s["attributes"].get("sidecar.request_id") == request_id]
    assert len(found) == 1, spans
    return found[0]


async def test_a_span_continues_the_clients_trace_and_the_upstream_joins_it(fake, traced, receiver):
    running, key, kid = await traced()
    status, headers, _ = await post(running.url, key, CHAT, {"traceparent": CLIENT_PARENT, "tracestate": "a=b"})
    assert status == 200
    span = only(await receiver.wait_for(1), headers["x-request-id"])
    assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_ID and span["kind"] == SERVER
    assert span["name"] == "chat m"
    a = span["attributes"]
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == "m" and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.request.max_tokens"] == 20
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (11, 5)
    assert a["http.request.method"] == "POST" and a["http.response.status_code"] == 200
    assert a["server.address"] == fake.url.removeprefix("http://").removesuffix("/v1")
    assert a["sidecar.key_id"] == kid and a["sidecar.outcome"] == "completed"
    assert a["sidecar.usage_source"] == "upstream"
    assert "error.type" not in a and span["status_code"] != ERROR
    assert key not in json.dumps(receiver.spans)  # the key itself never travels
    # The upstream got the sidecar's span as its parent, in the client's trace (not the client's own parent).
    sent = fake.last().headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{span['span_id']}-01", sent
    assert fake.last().headers.get("tracestate") == "a=b"
    assert receiver.resources[0]["service.name"] == "sidecar"


async def test_a_stream_has_its_first_token_and_a_trace_of_its_own_without_a_client_parent(fake, traced, receiver):
    running, key, _ = await traced()
    status, headers, _ = await post(running.url, key, {**CHAT, "stream": True})
    assert status == 200
    span = only(await receiver.wait_for(1), headers["x-request-id"])
    assert span["parent_span_id"] == "" and re.fullmatch("[0-9a-f]{32}", span["trace_id"])
    assert span["attributes"]["gen_ai.request.stream"] is True
    assert span["attributes"]["gen_ai.response.finish_reasons"] == ["stop"]
    first = [e for e in span["events"] if e["name"] == "gen_ai.first_token"]
    assert len(first) == 1 and span["start"] < first[0]["time"] <= span["end"]
    assert fake.last().headers["traceparent"].split("-")[1] == span["trace_id"]


async def test_a_disconnect_a_timeout_an_upstream_error_and_a_429_end_their_spans_as_they_ended(fake, traced, receiver):
    running, key, _ = await traced(upstream__first_byte_timeout=0.3)
    async with aiohttp.ClientSession() as s:
        hdrs = {"authorization": f"Bearer {key}", "x-fake-script": '{"hang_after": 2}'}
        async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=hdrs) as r:
            gone = r.headers["x-request-id"]
            await r.content.readany()
    _, h, _ = await post(running.url, key, CHAT, {"x-fake-script": '{"delay_headers": 2}'})
    timed_out = h["x-request-id"]
    _, h, _ = await post(running.url, key, CHAT, {"x-fake-script": '{"status": 500}'})
    failed = h["x-request-id"]
    async with aiohttp.ClientSession() as s:
        _, limited_key, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "one", "rpm": 1})
    await post(running.url, limited_key["key"], CHAT)
    status, h, _ = await post(running.url, limited_key["key"], CHAT)
    assert status == 429
    limited = h["x-request-id"]
    spans = await receiver.wait_for(5)
    expected = {
        gone: ("client_disconnected", ERROR),
        timed_out: ("timeout", ERROR),
        failed: ("upstream_error", ERROR),
        limited: ("429", 0),  # a refusal is the client's to handle: the server span is not in error
    }
    for request_id, (error_type, code) in expected.items():
        span = only(spans, request_id)
        assert (span["attributes"].get("error.type"), span["status_code"]) == (error_type, code), span
    assert only(spans, limited)["attributes"]["http.response.status_code"] == 429


async def test_a_path_we_do_not_serve_names_its_span_by_method_only(traced, receiver):
    running, key, _ = await traced()
    async with aiohttp.ClientSession() as s:
        async with s.get(running.url + "/scanner/probe/12345", headers={"authorization": f"Bearer {key}"}) as r:
            assert r.status == 404
            request_id = r.headers["x-request-id"]
        async with s.get(running.url + "/v1/models", headers={"authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            models_id = r.headers["x-request-id"]
    spans = await receiver.wait_for(2)
    probe, models = only(spans, request_id), only(spans, models_id)
    assert probe["name"] == "GET" and probe["attributes"]["error.type"] == "404" and probe["status_code"] != ERROR
    assert models["name"] == "GET /v1/models" and models["attributes"]["http.route"] == "/v1/models"


async def test_a_lease_wait_is_an_event_of_the_span(fake, traced, receiver):
    running, key, _ = await traced(limits__global_concurrency=1)
    slow = {"x-fake-script": '{"delay_headers": 0.5}'}
    (_, first, _), (_, second, _) = await asyncio.gather(
        post(running.url, key, CHAT, slow), post(running.url, key, CHAT, slow)
    )
    spans = await receiver.wait_for(2)
    waits = [
        e["attributes"]["sidecar.lease.wait_ms"]
        for rid in (first["x-request-id"], second["x-request-id"])
        for e in only(spans, rid)["events"]
        if e["name"] == "sidecar.lease.waited"
    ]
    assert len(waits) == 1 and waits[0] >= 300, waits  # the second waited for the first's slot


async def test_an_exporter_that_is_down_or_slow_costs_requests_nothing_and_drops_are_counted(traced, receiver):
    receiver.delay = 3.0  # a collector that takes 3 s to answer each batch
    running, key, _ = await traced(tracing__queue_size=4, tracing__export_timeout=1.0)
    statuses = [status for status, _, _ in await asyncio.gather(*(post(running.url, key, CHAT) for _ in range(40)))]
    assert statuses == [200] * 40
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        text = await r.text()
    dropped = float(re.search(r'^sidecar_trace_spans_total\{result="dropped"\} (\S+)$', text, re.M).group(1))
    queued = float(re.search(r'^sidecar_trace_spans_total\{result="queued"\} (\S+)$', text, re.M).group(1))
    assert dropped > 0 and dropped + queued == 40, text
    receiver.status, receiver.delay = 503, 0  # and a collector that refuses: still nothing for the requests
    statuses = [status for status, _, _ in await asyncio.gather(*(post(running.url, key, CHAT) for _ in range(10)))]
    assert statuses == [200] * 10
    for _ in range(100):  # every queued span fails (one collector too slow, then one refusing), and is counted
        async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
            text = await r.text()
        counts = dict(re.findall(r'^sidecar_trace_spans_total\{result="(\w+)"\} (\S+)$', text, re.M))
        if float(counts["failed"]) == float(counts["queued"]):
            break
        await asyncio.sleep(0.1)
    assert float(counts["failed"]) == float(counts["queued"]) > 0, counts
    assert float(counts["queued"]) + float(counts["dropped"]) == 50, counts


def test_off_by_default_nothing_of_opentelemetry_is_loaded(tmp_path):
    code = (
        "import sys\n"
        "from sidecar.config import load\n"
        "from sidecar.app import create_app\n"
        f"create_app(load(None, {{}}, {{'server.data_dir': {str(tmp_path)!r}, 'upstream.url': 'http://127.0.0.1:9'}}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def without_opentelemetry(tmp_path) -> dict[str, str]:
    """An environment whose Python cannot import OpenTelemetry's SDK: a package of that name, empty, ahead of
    site-packages on the path (as if the `otel` extra were not installed)."""
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "PYTHONPATH": str(tmp_path / "shadow"), "SIDECAR_SERVER_DATA_DIR": str(tmp_path)}


@pytest.mark.parametrize(
    "switch", [{"SIDECAR_TRACING_ENABLED": "true"}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}]
)
def test_tracing_asked_for_without_the_otel_extra_is_one_clear_start_up_error(tmp_path, switch):
    env = {**without_opentelemetry(tmp_path), **switch}
    argv = [sys.executable, "-m", "sidecar", "serve", "--upstream", "http://127.0.0.1:9/v1", "--port", "0"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sidecar: configuration error: tracing is on"), out.stderr
    assert "pip install 'sidecar[otel]'" in lines[0] and "Traceback" not in out.stderr


async def test_without_the_otel_extra_the_sidecar_serves_with_tracing_off(fake, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--upstream", fake.url, "--port", str(port)],
        env={**without_opentelemetry(tmp_path), "SIDECAR_AUTH_ENABLED": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        await wait_listening(port, proc)
        async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200 and (await r.json())["choices"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        reap(proc)


async def test_the_standard_otel_variables_turn_it_on_and_name_the_service(fake, receiver, tmp_path):
    port = free_port()
    proc = start(
        tmp_path,
        fake.url,
        port,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url.removesuffix("/v1/traces"),
        OTEL_SERVICE_NAME="llm-gateway",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    try:
        await wait_listening(port, proc)
        status, headers, _ = await post(f"http://127.0.0.1:{port}", "unused", {**CHAT, "stream": True})
        assert status == 200
        span = only(await receiver.wait_for(1), headers["x-request-id"])
    finally:
        reap(proc)
    assert span["resource"]["service.name"] == "llm-gateway"
    assert span["resource"]["deployment.environment"] == "test"
    assert span["name"] == "chat m"


async def test_content_only_when_opted_in_and_then_redacted_as_the_audit_would(traced, receiver):
    secret_prompt = "my card number is 4111 1111 1111 1111"
    body = {**CHAT, "messages": [{"role": "user", "content": secret_prompt}]}
    running, key, _ = await traced()
    _, plain, _ = await post(running.url, key, body)
    running, key, _ = await traced(
        tracing__capture_content=True, audit__redact_paths=("messages[*].content",), audit__sinks=()
    )
    _, opted, _ = await post(running.url, key, body)
    spans = await receiver.wait_for(2)
    off, on = only(spans, plain["x-request-id"]), only(spans, opted["x-request-id"])
    assert not any(k.startswith(("gen_ai.input", "gen_ai.output")) for k in off["attributes"])
    prompt = json.loads(on["attributes"]["gen_ai.input.messages"])
    assert prompt["messages"][0]["role"] == "user" and "sha256" in prompt["messages"][0]["content"]
    assert secret_prompt not in json.dumps(receiver.spans)
    answer = json.loads(on["attributes"]["gen_ai.output.messages"])
    assert answer["choices"][0]["message"]["role"] == "assistant" and answer["choices"][0]["message"]["content"]
