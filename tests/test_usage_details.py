"""Usage details (`cached_tokens`, `cache_write_tokens`, `reasoning_tokens`) on every row and every surface:
read from every shape the sidecar knows, null when the upstream does not say, stored by both stores (the
`store_url` fixture runs SQLite and PostgreSQL), shown by `/v1/usage`, `/admin/usage` (JSON and CSV),
`/admin/requests`, `sidecar usage` and `sidecar requests`, audit records, spans and `sidecar_tokens_total`."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import sys

import aiohttp
import orjson
import pytest

from sidecar.store import open_store
from sidecar.store.base import RequestQuery
from sidecar.store.sqlite import MIGRATIONS
from sidecar.wire.sse import StreamScanner
from sidecar.wire.usage import Usage, usage_from, usage_of
from tests.support.clients import ADMIN, admin
from tests.support.stores import opened

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}
MESSAGES = {"model": "fake-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


# --- every shape --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # OpenAI chat/completions as vLLM reports them
        (
            {
                "prompt_tokens": 11,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 6},
            },
            Usage(11, 9, 4, None, 6),
        ),
        # the Responses API
        (
            {
                "input_tokens": 11,
                "output_tokens": 9,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens_details": {"reasoning_tokens": 6},
            },
            Usage(11, 9, 4, None, 6),
        ),
        # Anthropic: input_tokens leaves the cache's part out; prompt_tokens puts it back
        (
            {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 4},
            Usage(12, 2, 3, 4, None),
        ),
        ({"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 0}, Usage(5, 2, 0, None, None)),
        # llama-server's OpenAI shape; SGLang's meta_info (cached_tokens at its top)
        ({"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}, Usage(7, 1, None, None, None)),
        ({"prompt_tokens": 7, "completion_tokens": 1, "cached_tokens": 5}, Usage(7, 1, 5, None, None)),
        # details that are not counts are not figures
        (
            {"prompt_tokens": 7, "completion_tokens": 1, "prompt_tokens_details": None, "reasoning_tokens": "x"},
            Usage(7, 1, None, None, None),
        ),
    ],
)
def test_every_usage_shape_gives_its_details(shape, expected):
    assert usage_from(shape) == expected


def test_native_and_wrapped_shapes():
    # llama-server's native answer: `tokens_cached` is the slot's whole cache, `timings.cache_n` the prompt's reuse
    native = {"tokens_evaluated": 9, "tokens_predicted": 3, "tokens_cached": 12, "timings": {"cache_n": 6}}
    assert usage_of(native) == Usage(9, 3, 6)
    assert usage_of({"tokens_evaluated": 9, "tokens_predicted": 3, "tokens_cached": 12}) == Usage(9, 3, None)
    assert usage_of({"meta_info": {"prompt_tokens": 4, "completion_tokens": 2, "cached_tokens": 3}}) == Usage(4, 2, 3)
    message = {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}}
    assert usage_of(message) == Usage(5, 1)


def test_an_anthropic_stream_keeps_the_input_of_message_start_when_message_delta_counts_the_output():
    scanner = StreamScanner(family="messages")
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "usage": {
                "input_tokens": 5,
                "output_tokens": 1,
                "cache_read_input_tokens": 3,
                "cache_creation_input_tokens": 2,
            },
        },
    }
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}
    scanner.feed(b"event: message_start\ndata: " + orjson.dumps(start) + b"\n\n")
    scanner.feed(b"event: message_delta\ndata: " + orjson.dumps(delta) + b"\n\n")
    assert scanner.usage == Usage(10, 7, 3, 2, None)


# --- every surface, on both stores --------------------------------------------------------------------------


async def test_details_on_every_surface(fake, sidecar_factory, store_url, receiver, tmp_path):
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        store__url=store_url,
        upstream__routes=("POST /v1/messages",),
        audit__capture="all",
        audit__sinks=("db",),
        tracing__enabled=True,
        tracing__endpoint=receiver.url,
        tracing__export_delay=0.05,
    )
    fake.script.cached_tokens, fake.script.reasoning_tokens = 4, 3
    async with aiohttp.ClientSession() as s:
        async with s.get(running.url + "/metrics") as r:  # a scrape learns the models the upstream lists
            assert r.status == 200
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "details"})
        key, _kid = created["key"], created["id"]
        auth = {"authorization": f"Bearer {key}"}
        ids = []
        for path, body in (
            ("/v1/chat/completions", CHAT),
            ("/v1/chat/completions", {**CHAT, "stream": True}),  # usage asked for by the sidecar and hidden
            ("/v1/messages", MESSAGES),  # Anthropic's shape (the fake reports a cache read and a cache write)
        ):
            async with s.post(running.url + path, json=body, headers=auth) as r:
                assert r.status == 200, await r.text()
                await r.read()
                ids.append(r.headers["x-request-id"])
        fake.script.cached_tokens = fake.script.reasoning_tokens = None
        async with s.post(running.url + "/v1/chat/completions", json=CHAT, headers=auth) as r:
            assert r.status == 200
            ids.append(r.headers["x-request-id"])
        await running.stored(4)

        # the rows, through /admin/requests
        _, page, _ = await admin(s, "GET", running.url + "/admin/requests?limit=10")
        rows = {row["request_id"]: row for row in page["data"]}
        details = ("prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens", "reasoning_tokens")
        assert [tuple(rows[i][k] for k in details) for i in ids] == [
            (11, 4, None, 5, 3),
            (11, 4, None, 5, 3),
            (11, 3, 4, 5, None),  # input 4 + cache read 3 + cache write 4
            (11, None, None, 5, None),  # the upstream said nothing of details: null, not 0
        ]
        # /v1/usage (the key's own) and /admin/usage, JSON and CSV: sums
        sums = {"prompt_tokens": 44, "cached_tokens": 11, "cache_write_tokens": 4, "reasoning_tokens": 6}
        async with s.get(running.url + "/v1/usage", headers=auth) as r:
            (own,) = (await r.json())["data"]
        assert {k: own[k] for k in sums} == sums
        _, by_key, _ = await admin(s, "GET", running.url + "/admin/usage?by=key")
        assert {k: by_key["data"][0][k] for k in sums} == sums
        async with s.get(
            running.url + "/admin/usage?by=key&format=csv", headers={"authorization": f"Bearer {ADMIN}"}
        ) as r:
            (row,) = list(csv.DictReader(io.StringIO(await r.text())))
        assert {k: int(row[k]) for k in sums} == sums
        # audit records carry them
        _, audited, _ = await admin(s, "GET", running.url + f"/admin/audit-records?request_id={ids[2]}")
        usage = audited["data"][0]["usage"]
        assert (usage["prompt_tokens"], usage["cached_tokens"], usage["cache_write_tokens"]) == (11, 3, 4)
        # metrics: the details are kinds of their own
        async with s.get(running.url + "/metrics") as r:
            text = await r.text()
    for kind, n in (("cached", 11), ("cache_write", 4), ("reasoning", 6)):
        assert f'sidecar_tokens_total{{kind="{kind}",model="fake-model"}} {n}.0' in text, kind
    # spans: gen_ai.usage.*
    spans = {sp["attributes"].get("sidecar.request_id"): sp["attributes"] for sp in await receiver.wait_for(4)}
    first, anthropic, plain = spans[ids[0]], spans[ids[2]], spans[ids[3]]
    assert first["gen_ai.usage.cache_read.input_tokens"] == 4 and first["gen_ai.usage.reasoning.output_tokens"] == 3
    assert anthropic["gen_ai.usage.cache_creation.input_tokens"] == 4 and anthropic["gen_ai.usage.input_tokens"] == 11
    assert not any(k.startswith("gen_ai.usage.cache") for k in plain)

    # the CLI: usage (table, CSV) and requests (table, JSON)
    env = {**os.environ, "SIDECAR_STORE_URL": store_url, "SIDECAR_SERVER_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    (as_csv,) = list(csv.DictReader(io.StringIO(cli("usage", "--since", "1h", "--format", "csv"))))
    assert {k: int(as_csv[k]) for k in sums} == sums
    header, *lines = cli("usage", "--since", "1h").splitlines()
    assert header.split()[6:9] == ["cached_tokens", "cache_write_tokens", "reasoning_tokens"], header
    header, *lines = cli("requests", "--since", "1h").splitlines()
    assert "cached_tokens" in header.split() and "reasoning_tokens" in header.split() and len(lines) == 4
    listed = {r["request_id"]: r for r in orjson.loads(cli("requests", "--since", "1h", "--format", "json"))}
    assert listed[ids[2]]["cache_write_tokens"] == 4 and listed[ids[3]]["reasoning_tokens"] is None


async def test_a_store_of_the_previous_version_gains_the_columns_and_keeps_its_rows(store_url):
    """Version 7 adds the columns to a store that has rows: they stay, with null details."""
    store = open_store(store_url)
    store.migrations = store.migrations[:6]  # a store as the previous release left it, with a row of its own
    await store.open()
    await store.migrate()
    assert await store.schema_version() == 6
    old = {
        "request_id": "req_old", "method": "POST", "path": "/v1/chat/completions", "stream": False, "status": 200,
        "outcome": "completed", "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cached_tokens": 1,
        "usage_source": "upstream", "latency_ms": 1.0, "bytes_in": 1, "bytes_out": 1, "chunks": 0,
        "started_at": 1.0e9, "finished_at": 1.0e9,
    }  # fmt: skip
    await store._insert_lines("request_log", tuple(old), [orjson.dumps(old)])
    await store.close()
    upgraded = await opened(store_url)
    try:
        assert await upgraded.schema_version() == len(MIGRATIONS) == len(upgraded.migrations) >= 7
        (row,) = await upgraded.requests(RequestQuery(limit=5))
        assert (row["cached_tokens"], row["cache_write_tokens"], row["reasoning_tokens"]) == (1, None, None)
    finally:
        await upgraded.close()


async def test_invocations_are_recorded_audited_and_counted_as_the_route_they_dispatch_to(fake, sidecar_factory):
    """vLLM's `/invocations` with a chat body: the model, the hidden usage chunk, the details, the audit
    aggregate and the token series, as on `/v1/chat/completions`."""
    running = await sidecar_factory(fake.url, upstream__kind="vllm", audit__capture="all", audit__sinks=("db",))
    fake.script.cached_tokens, fake.script.reasoning_tokens = 2, 1
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/invocations", json={**CHAT, "stream": True}) as r:
            assert r.status == 200
            body = await r.read()
    assert b'"usage"' not in body and orjson.loads(fake.last().body)["stream_options"] == {"include_usage": True}
    (row,) = await running.stored(1)
    assert (row["path"], row["model"], row["prompt_tokens"], row["completion_tokens"]) == (
        "/invocations",
        "fake-model",
        11,
        5,
    )
    assert (row["cached_tokens"], row["reasoning_tokens"], row["usage_source"]) == (2, 1, "upstream")
    from sidecar.app import STORE

    store = running.server.app[STORE]
    for _ in range(200):
        if audited := await store.audit_records(RequestQuery(limit=5)):
            break
        await asyncio.sleep(0.02)
    (record,) = audited
    assert record["complete"] and record["model"] == "fake-model" and record["usage"]["cached_tokens"] == 2
    response = record["response"]
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"]["content"] == "".join(f"tok{i} " for i in range(5))
    async with aiohttp.ClientSession() as s, s.get(running.url + "/metrics") as r:
        text = await r.text()
    assert 'sidecar_requests_total{code="200",outcome="completed",route="/invocations"} 1.0' in text
