"""Audit capture: aggregation equals the non-streaming answer, partial records, redaction, a stuck sink."""

from __future__ import annotations

import asyncio
import base64
import glob
import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest

from sidecar.audit.capture import AuditPolicy, sampled
from sidecar.audit.chat import Aggregate, Chunk, decode_chunks
from sidecar.audit.files import JsonlSink
from sidecar.config import AuditCfg, ConfigError, load
from tests.support.disks import fill, small_disk
from tests.support.processes import reap
from tests.support.waits import free_port, wait_for, wait_listening

CANARY_HEADER = "sk-canary-header-7f3a"
CANARY_BODY = "canary-body-secret-91c2"
CHAT = {
    "model": "m",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": CANARY_BODY}],
    "store": True,
}


def records(audit_dir) -> list[dict]:
    out = []
    for path in sorted(glob.glob(f"{audit_dir}/audit-*.jsonl*")):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            out += [orjson.loads(line) for line in f if line.strip()]
    return out


async def wait_records(audit_dir, n, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = records(audit_dir)
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    return records(audit_dir)


def test_aggregate_tool_calls_reasoning_and_choices():
    agg = Aggregate()
    events = [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "reasoning_content": "think "}}],
        },
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hard"}}]},
        {"choices": [{"index": 1, "delta": {"content": "B1"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"ci'}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": 1}'}}]}}]},
        {
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
                {"index": 1, "delta": {"content": "B2"}, "finish_reason": "stop"},
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
    ]
    for e in events:
        agg.add(msgspec.convert(e, Chunk))
    out = agg.result()
    # The same events as one stream, through the typed decode and the short loop for plain content chunks.
    plain = [{"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]} for i in range(3)]
    regions = [b"data: " + orjson.dumps(e) for e in (events[:1] + plain + events[1:])]
    fast = Aggregate()
    fast.add_all(decode_chunks([b"\n\n".join(regions) + b"\n\ndata: [DONE]"], b"\n\n"))
    slow = Aggregate()
    for e in events[:1] + plain + events[1:]:
        slow.add(msgspec.convert(e, Chunk))
    assert fast.result() == slow.result()
    assert fast.result()["choices"][0]["message"]["content"] == "t0 t1 t2 "
    assert out["id"] == "c1" and out["object"] == "chat.completion" and out["usage"]["total_tokens"] == 12
    first, second = out["choices"]
    assert first["message"]["reasoning_content"] == "think hard" and first["finish_reason"] == "tool_calls"
    assert first["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": 1}'}}
    ]
    assert second["message"]["content"] == "B1B2" and second["finish_reason"] == "stop"


def test_sampling_is_deterministic_and_close_to_the_rate():
    ids = [f"req_{i:024x}" for i in range(10_000)]
    picked = [sampled(i, 0.25) for i in ids]
    assert picked == [sampled(i, 0.25) for i in ids]
    assert abs(sum(picked) / 10_000 - 0.25) < 0.02
    policy = AuditPolicy(AuditCfg(capture="all", sample_rate=0.0))
    assert not policy.wants(ids[0], None, {}) and policy.wants(ids[0], "on", {})  # forced keys bypass sampling
    assert not AuditPolicy(AuditCfg(capture="all")).wants(ids[0], "off", {})
    store_flag = AuditPolicy(AuditCfg(capture="store_flag"))
    assert store_flag.wants(ids[0], None, {"store": True}) and not store_flag.wants(ids[0], None, {"store": "yes"})


@pytest.fixture
async def audited(fake, sidecar_factory, tmp_path):
    return await sidecar_factory(
        fake.url,
        audit__capture="store_flag",
        audit__sinks="jsonl,db",
        audit__jsonl_dir=str(tmp_path / "audit"),
        audit__redact_paths="messages[*].content",
    )


async def test_stream_aggregate_equals_the_non_streaming_response(fake, audited, tmp_path):
    fake.script.chunks = 12
    async with aiohttp.ClientSession() as s:
        async with s.post(audited.url + "/v1/chat/completions", json=CHAT) as r:
            whole = await r.json()
        async with s.post(audited.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            await r.read()
        async with s.post(audited.url + "/v1/chat/completions", json={**CHAT, "store": False}) as r:
            await r.read()  # not audited
    got = await wait_records(tmp_path / "audit", 2)
    assert len(got) == 2
    plain, streamed = got
    assert fake.received[1].json["store"] is True  # passed upstream unchanged
    assert streamed["complete"] is True and streamed["stream"] is True and streamed["schema_version"] == 1
    agg = streamed["response"]
    assert agg["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
    assert agg["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert agg["usage"] == whole["usage"] and plain["response"] == whole
    assert streamed["usage"]["completion_tokens"] == 12 and streamed["timings"]["ttft_ms"] is not None


async def test_disconnect_mid_stream_gives_a_partial_record(fake, audited, tmp_path):
    from tests.support.clients import open_stream

    fake.script.chunks, fake.script.delay_chunks = 100, 0.02
    reader, writer = await open_stream(audited.port, {**CHAT, "stream": True})
    seen = b""
    while seen.count(b"tok") < 5:
        seen += await reader.read(65536)
    writer.transport.abort()
    (record,) = await wait_records(tmp_path / "audit", 1)
    assert record["complete"] is False and record["outcome"] == "client_disconnected"
    content = record["response"]["choices"][0]["message"]["content"]
    assert content.startswith("tok0 tok1 tok2 tok3 tok4") and "tok99" not in content


async def test_redaction_in_every_sink(fake, audited, tmp_path):
    async with aiohttp.ClientSession() as s:
        async with s.post(
            audited.url + "/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {CANARY_HEADER}", "x-my-token": CANARY_HEADER, "user-agent": "ua-test"},
        ) as r:
            assert r.status == 200
        async with s.get(audited.url + "/admin/audit-records") as r:
            pass  # admin API is off here; the db sink is read straight from the store below
    (record,) = await wait_records(tmp_path / "audit", 1)
    from sidecar.app import STORE
    from sidecar.store.base import RequestQuery

    await asyncio.sleep(0.2)
    db_rows = await audited.server.app[STORE].audit_records(RequestQuery(limit=10))
    assert len(db_rows) == 1 and db_rows[0]["request_id"] == record["request_id"]
    exported = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "export", "--since", "1h"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "SIDECAR_STORE_URL": audited.server.settings.store.url,
            "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        },
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    assert [orjson.loads(line)["request_id"] for line in exported.stdout.splitlines()] == [record["request_id"]]
    for text in (orjson.dumps(record).decode(), orjson.dumps(db_rows).decode(), exported.stdout):
        assert CANARY_HEADER not in text and CANARY_BODY not in text
    assert record["request"]["headers"]["user-agent"] == "ua-test"
    content = record["request"]["body"]["messages"][1]["content"]
    assert content["redacted"] is True and content["length"] == len(CANARY_BODY)
    assert oct(os.stat(tmp_path / "audit").st_mode & 0o777) == "0o700"
    assert all(oct(os.stat(p).st_mode & 0o777) == "0o600" for p in glob.glob(f"{tmp_path}/audit/*"))


async def test_payload_cap_keeps_metadata(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url,
        audit__capture="all",
        audit__jsonl_dir=str(tmp_path / "a"),
        audit__max_payload_bytes=500,
        audit__jsonl_gzip=True,
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "pad": "x" * 2000}) as r:
            assert r.status == 200
    (record,) = await wait_records(tmp_path / "a", 1)
    assert record["truncated"] is True and record["request"]["body"] is None and record["usage"]["total_tokens"] == 16


async def test_a_sink_that_blocks_forever(fake, tmp_path):
    """The stderr sink writes into a pipe nobody reads: requests keep flowing, drops are counted, exit is clean."""
    port = free_port()
    env = {
        **os.environ,
        "SIDECAR_SERVER_DATA_DIR": str(tmp_path),
        "SIDECAR_STORE_URL": f"sqlite:///{tmp_path}/b.db",
        "SIDECAR_UPSTREAM_URL": fake.url,
        "SIDECAR_AUTH_ENABLED": "false",
        "SIDECAR_AUDIT_CAPTURE": "all",
        "SIDECAR_AUDIT_SINKS": "stderr",
        "SIDECAR_AUDIT_QUEUE_SIZE": "50",
        "SIDECAR_SERVER_LOG_LEVEL": "error",
        "SIDECAR_SERVER_REQUEST_LOG": str(tmp_path / "requests.jsonl"),
        "SIDECAR_SERVER_DRAIN_GRACE": "0",
        "SIDECAR_WRITER_DRAIN_TIMEOUT": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve", "--port", str(port)],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )  # stderr is never read
    try:
        await wait_listening(port, proc)
        body = {**CHAT, "pad": "y" * 4000}  # ~4 KiB records: the 64 KiB pipe fills after a few
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            for _ in range(300):
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
            elapsed = time.monotonic() - started
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                metrics = await r.text()
        assert elapsed < 30
        dropped = float(metrics.split('sidecar_audit_dropped_total{reason="queue_full"} ')[1].split()[0])
        assert dropped >= 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        reap(proc)


async def test_disconnect_while_waiting_for_a_whole_answer_is_still_audited(fake, audited, tmp_path):
    from tests.support.clients import open_stream

    fake.script.delay_headers = 5.0
    _, writer = await open_stream(audited.port, CHAT)
    while not fake.received:
        await asyncio.sleep(0.01)
    writer.transport.abort()
    (record,) = await wait_records(tmp_path / "audit", 1)
    assert record["complete"] is False and record["outcome"] == "client_disconnected"
    assert record["response"] is None and record["request"]["body"]["model"] == CHAT["model"]


async def test_a_padded_request_is_cut_field_by_field_not_hidden(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url, audit__capture="all", audit__jsonl_dir=str(tmp_path / "a"), audit__max_payload_bytes=20_000
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "pad": "x" * 200_000}) as r:
            assert r.status == 200
    (record,) = await wait_records(tmp_path / "a", 1)
    body = record["request"]["body"]
    assert body["messages"][1]["content"] == CANARY_BODY  # the prompt is there
    assert body["pad"]["truncated"] is True and body["pad"]["length"] == 200_000
    assert record["request"]["bytes"] > 200_000 and len(record["request"]["sha256"]) == 64
    assert len(orjson.dumps(record)) <= 20_000


async def test_a_long_audited_stream_is_folded_as_it_goes_and_cut_at_the_cap(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url, audit__capture="all", audit__jsonl_dir=str(tmp_path / "a"), audit__max_payload_bytes=20_000
    )
    fake.script.chunks = 6000  # ~900 KB of events, ~40 KB of content
    seen_kept = []
    proxy = running.server.app[__import__("sidecar.app").app.PROXY]
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            async for _ in r.content.iter_chunked(65536):
                for task in proxy.in_flight.tasks:  # what the scanner holds while the stream runs
                    coro = task.get_coro()
                    while coro is not None:  # down the await chain to the proxy's frame holding the exchange
                        ex = coro.cr_frame.f_locals.get("ex") if getattr(coro, "cr_frame", None) else None
                        if ex is not None and getattr(ex, "scanner", None) is not None:
                            seen_kept.append(ex.scanner.kept)
                            break
                        coro = getattr(coro, "cr_await", None)
            assert r.status == 200
    (record,) = await wait_records(tmp_path / "a", 1)
    content = record["response"]["choices"][0]["message"]["content"]
    assert record["response"]["truncated"] is True and record["truncated"] is True
    assert content["truncated"] is True and content["prefix"].startswith("tok0 tok1 tok2")
    assert record["usage"]["completion_tokens"] == 6000  # usage is the record's, whatever the cut
    assert len(orjson.dumps(record)) <= 20_000
    assert seen_kept and max(seen_kept) <= 300_000  # raw events held at any time: about one fold


def test_many_small_messages_cannot_push_the_last_one_out():
    from sidecar.audit.capture import shrink

    doc = {
        "model": "m",
        "messages": [{"role": "user", "content": "pad"}] * 9000 + [{"role": "user", "content": "real"}],
    }
    cut = shrink(doc, 20_000)
    assert cut["messages"][-1] == {"role": "user", "content": "real"}
    assert any(isinstance(m, dict) and m.get("omitted") for m in cut["messages"])
    assert len(orjson.dumps(cut)) <= 20_000


async def test_with_redact_paths_a_cut_response_keeps_no_raw_prefix(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(
        fake.url,
        audit__capture="all",
        audit__jsonl_dir=str(tmp_path / "a"),
        audit__max_payload_bytes=600,
        audit__redact_paths=["choices[*].message.content"],
    )
    fake.script.chunks = 200  # a response over the cap
    async with aiohttp.ClientSession() as s:
        async with s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
    (record,) = await wait_records(tmp_path / "a", 1)
    response = record["response"]
    assert response is None or (response["truncated"] is True and "prefix" not in response), response


PATHS = {  # how the request ends -> (fake's script, sidecar options, the record's outcome)
    "completed": ({}, {}, "completed"),
    "idle-timeout": ({"hang_after": 2}, {"upstream__stream_idle_timeout": 0.3}, "upstream_timeout"),
    "total-timeout": ({"chunks": 40, "delay_chunks": 0.05}, {"upstream__total_timeout": 0.4}, "upstream_timeout"),
    "upstream-500": ({"status": 500}, {}, "upstream_error"),
    "upstream-drop": ({"chunks": 10, "drop_after": 3}, {}, "upstream_error"),
    "client-gone": ({"chunks": 100, "delay_chunks": 0.02}, {}, "client_disconnected"),
}


@pytest.mark.parametrize("path", PATHS)
async def test_redaction_holds_on_every_way_a_request_ends(fake, sidecar_factory, tmp_path, path):
    """The canaries (a credential header, a redacted body path) are absent from the audit record whatever
    ended the request; and a `request_id` in the client's body is the client's, never the record's."""
    from tests.support.clients import open_stream

    script, options, outcome = PATHS[path]
    for name, value in script.items():
        setattr(fake.script, name, value)
    running = await sidecar_factory(
        fake.url,
        audit__capture="store_flag",
        audit__sinks="jsonl",
        audit__jsonl_dir=str(tmp_path / "audit"),
        audit__redact_paths="messages[*].content",
        **options,
    )
    body = {**CHAT, "stream": True, "request_id": "req_client_chosen"}
    headers = {"authorization": f"Bearer {CANARY_HEADER}", "x-my-token": CANARY_HEADER}
    if path == "client-gone":
        reader, writer = await open_stream(running.port, body, headers)
        seen = b""
        while seen.count(b"tok") < 3:
            seen += await reader.read(65536)
        writer.transport.abort()
        ours = None
    else:
        url = running.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
            await r.read()
            ours = r.headers["x-request-id"]
    (record,) = await wait_records(tmp_path / "audit", 1)
    assert record["outcome"] == outcome
    text = orjson.dumps(record).decode()
    assert CANARY_HEADER not in text and CANARY_BODY not in text
    assert record["request_id"].startswith("req_") and record["request_id"] != "req_client_chosen"
    assert ours is None or record["request_id"] == ours
    assert record["request"]["body"]["request_id"] == "req_client_chosen"  # the client's field, kept as sent


def audit_line(i: int) -> bytes:
    """An audit record of about 2 KB that gzip cannot shrink much (so a batch of them outgrows a page or two)."""
    pad = base64.b64encode(os.urandom(1500)).decode()
    return orjson.dumps({"request_id": f"req_{i:06d}", "emitted_at": time.time(), "pad": pad}) + b"\n"


def segment_lines(directory: Path) -> list[bytes]:
    """Every line of every segment, read whole (a torn gzip member raises here, as it would for `zcat`)."""
    out: list[bytes] = []
    for path in sorted(directory.glob("audit-*.jsonl*")):
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        out += data.splitlines()
    return out


@pytest.mark.parametrize("gzip_on", [False, True], ids=["plain", "gzip"])
async def test_a_full_disk_loses_or_keeps_whole_audit_records_never_part_of_one(tmp_path, gzip_on):
    """The jsonl sink's segment on a small tmpfs filled to a page or two: a batch that does not fit is written in
    part, then fails; the part is cut off again, so the segment holds whole records only, and once there is
    room again the next batches follow them (not half a record). Every line parses; exactly the records counted
    written are there, once each."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        sink = JsonlSink(1000, str(disk / "audit"), 1 << 30, 3600.0, gzip_on)
        await sink.start()
        try:
            sink.offer(audit_line(0), {})
            await wait_for(lambda: sink.written == 1, 10)  # the segment exists before the disk fills
            filler = fill(disk)
            os.truncate(filler, filler.stat().st_size - 6000)  # a page or two free: less than the next batch
            for i in range(1, 9):
                sink.offer(audit_line(i), {})
            await wait_for(lambda: sink.written + sink.failed == 9, 10)
            assert sink.failed > 0
            filler.unlink()
            for i in range(9, 14):
                sink.offer(audit_line(i), {})
            await wait_for(lambda: sink.written + sink.failed == 14, 10)
        finally:
            await sink.close(5.0)
        lines = segment_lines(disk / "audit")
        ids = [orjson.loads(line)["request_id"] for line in lines]
    assert len(ids) == len(set(ids)) == sink.written
    assert {f"req_{i:06d}" for i in range(9, 14)} <= set(ids)


async def test_jsonl_segments_past_their_retention_are_deleted(fake, sidecar_factory, tmp_path):
    """`audit.jsonl_retention`: at start (and every 10 minutes) the sink deletes the segments, any replica's,
    last written longer ago; newer ones, the one being written and files that are not segments stay."""
    audit = tmp_path / "audit"
    audit.mkdir(mode=0o700)
    day = 86400.0
    ages = {"audit-20200101T000000Z-7-00001.jsonl": 9, "audit-20200101T000000Z-8-00002.jsonl.gz": 8}
    ages |= {"audit-20200101T000000Z-9-00003.jsonl": 6, "notes.txt": 30}
    for name, days in ages.items():
        (audit / name).write_bytes(b"{}\n")
        os.utime(audit / name, (time.time() - days * day,) * 2)
    running = await sidecar_factory(
        fake.url, audit__capture="all", audit__jsonl_dir=str(audit), audit__jsonl_retention="7d"
    )
    await wait_for(lambda: not (audit / "audit-20200101T000000Z-7-00001.jsonl").exists(), 5)
    async with aiohttp.ClientSession() as s, s.post(running.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
    await running.server.runner.cleanup()  # the sink writes its record and closes the segment
    left = sorted(p.name for p in audit.iterdir())
    assert [n for n in left if n.startswith("audit-2020")] == ["audit-20200101T000000Z-9-00003.jsonl"]
    assert "notes.txt" in left and len(records(audit)) == 2  # the 6-day-old segment's record, and the new one
    assert "audit segments past audit.jsonl_retention deleted" in running.log_text()
    with pytest.raises(ConfigError, match="audit.jsonl_retention: expected a duration"):
        load(None, {}, {"audit.jsonl_retention": "7 days"})
    assert load(None, {}, {"audit.jsonl_retention": "0"}).audit.jsonl_retention == "0"  # kept forever
