"""The relay end to end over real sockets: byte equality, headers, timeouts, upstream failures."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.bodies import CHAT
from tests.support.clients import post
from tests.support.fake_upstream import SHAPED_ANSWERS
from tests.support.waits import free_port, wait_for


async def test_non_streaming_body_is_byte_identical_and_ids_match(fake, sidecar):
    status, headers, body = await post(sidecar.url + "/v1/chat/completions", CHAT)
    assert status == 200
    rid = headers["x-request-id"]
    assert rid.startswith("req_")
    assert fake.last().headers["x-request-id"] == rid
    assert body == fake.sent[rid]
    row = sidecar.rows[-1]
    assert row["request_id"] == rid and row["outcome"] == "completed" and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (11, 5, "upstream")


async def test_stream_with_client_usage_is_byte_identical(fake, sidecar):
    fake.script.chunks = 40
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, data = await post(sidecar.url + "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert data == fake.sent[headers["x-request-id"]]
    assert fake.last().json == body  # the client asked for usage itself: its body goes up untouched
    row = sidecar.rows[-1]
    assert row["completion_tokens"] == 40 and row["usage_source"] == "upstream" and row["chunks"] >= 1


async def test_stream_without_client_usage_hides_only_the_usage_chunk(fake, sidecar):
    body = {**CHAT, "stream": True}
    _status, headers, data = await post(sidecar.url + "/v1/chat/completions", body)
    sent = fake.sent[headers["x-request-id"]]
    events = sent.split(b"\n\n")
    usage_events = [e for e in events if b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert data == sent.replace(usage_events[0] + b"\n\n", b"")
    assert fake.last().json["stream_options"] == {"include_usage": True}
    assert sidecar.rows[-1]["completion_tokens"] == 5 and sidecar.rows[-1]["usage_source"] == "upstream"


async def test_crlf_stream_is_relayed_exactly(fake, sidecar):
    fake.script.crlf = True
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    _, headers, data = await post(sidecar.url + "/v1/chat/completions", body)
    assert data == fake.sent[headers["x-request-id"]]
    assert sidecar.rows[-1]["completion_tokens"] == 5


async def test_stream_from_upstream_without_usage_is_counted(fake, sidecar):
    fake.script.usage = False
    fake.script.chunks = 7
    _, headers, data = await post(sidecar.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert data == fake.sent[headers["x-request-id"]]
    row = sidecar.rows[-1]
    assert (row["completion_tokens"], row["usage_source"]) == (7, "counted")


async def test_hop_by_hop_and_credentials_never_reach_the_upstream(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(fake.url, upstream__api_key="upstream-secret-1")
    headers = {
        "Authorization": "Bearer sk-client-canary",
        "x-api-key": "sk-client-canary2",
        "Cookie": "a=b",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "Upgrade": "h2c",
        "X-Keep-Me": "yes",
        "x-request-id": "client-id-7",
    }
    status, resp_headers, _ = await post(running.url + "/v1/chat/completions", CHAT, headers)
    assert status == 200
    got = {k.lower(): v for k, v in fake.last().headers.items()}
    for name in ("x-drop-me", "keep-alive", "te", "proxy-authorization", "upgrade", "x-api-key", "cookie"):
        assert name not in got, name
    assert got["authorization"] == "Bearer upstream-secret-1"
    assert got["x-keep-me"] == "yes"
    assert got["x-request-id"] == resp_headers["x-request-id"] != "client-id-7"
    assert running.rows[-1]["client_request_id"] == "client-id-7"
    assert "canary" not in running.log_text() and "upstream-secret-1" not in running.log_text()


async def test_response_hop_by_hop_headers_are_stripped(sidecar_factory):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=b'{"ok":true}',
            headers={
                "content-type": "application/json",
                "Connection": "X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=1",
                "X-Visible": "v",
                "Set-Cookie": "s=1",
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{server.port}/v1")
        status, headers, body = await post(running.url + "/v1/chat/completions", CHAT)
        lower = {k.lower() for k in headers}
        assert status == 200 and body == b'{"ok":true}'
        assert "x-secret-hop" not in lower and "keep-alive" not in lower and "set-cookie" not in lower
        assert headers["X-Visible"] == "v"
    finally:
        await server.close()


async def test_upstream_down_is_a_fast_502(sidecar_factory):
    running = await sidecar_factory(f"http://127.0.0.1:{free_port()}/v1")
    status, _headers, body = await post(running.url + "/v1/chat/completions", CHAT)
    assert status == 502
    err = orjson.loads(body)["error"]
    assert err["code"] == "upstream_unreachable" and err["type"] == "upstream_error"
    assert set(err) == {"message", "type", "param", "code"}
    assert running.rows[-1]["outcome"] == "upstream_error"


async def test_no_headers_in_time_is_a_504(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__first_byte_timeout=0.3)
    fake.script.delay_headers = 5
    status, _, body = await post(running.url + "/v1/chat/completions", CHAT)
    assert status == 504 and orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert running.rows[-1]["outcome"] == "upstream_timeout"
    await wait_for(lambda: fake.last().closed_at is not None, 2)


async def test_headers_but_no_first_event_in_time_is_a_504(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__first_byte_timeout=0.3)
    fake.script.delay_first = 5
    status, headers, body = await post(running.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 504 and headers["content-type"] == "application/json"  # a JSON error: the stream never began
    error = orjson.loads(body)["error"]
    assert (error["type"], error["code"]) == ("upstream_timeout", "upstream_timeout") and "first_byte" in error[
        "message"
    ]
    row = (await running.stored(1))[0]
    assert (row["outcome"], row["status"], row["upstream_status"], row["ttft_ms"]) == (
        "upstream_timeout",
        504,
        200,
        None,
    )
    await wait_for(lambda: fake.last().closed_at is not None, 2)  # and the upstream request was closed


async def test_idle_stream_ends_with_an_error_event_and_no_done(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__stream_idle_timeout=0.3)
    fake.script.hang_after = 2
    status, _, data = await post(running.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    assert b"[DONE]" not in data
    assert data.endswith(b"\n\n")
    last = data.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["code"] == "upstream_timeout"
    assert data.count(b"tok") == 2
    row = running.rows[-1]
    assert row["outcome"] == "upstream_timeout" and row["status"] == 200 and row["completion_tokens"] == 2
    await wait_for(lambda: fake.last().closed_at is not None, 2)


async def test_slow_but_steady_stream_longer_than_every_timeout_completes(fake, sidecar_factory):
    """First byte, idle and (off) total limits all shorter than the stream: only silence ends a stream."""
    running = await sidecar_factory(
        fake.url, upstream__stream_idle_timeout=0.25, upstream__first_byte_timeout=0.3, upstream__total_timeout=0
    )
    fake.script.chunks, fake.script.delay_chunks = 8, 0.1  # 0.8 s in all, never 0.25 s quiet
    _, _headers, data = await post(running.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b"tok") == 8
    assert running.rows[-1]["outcome"] == "completed"


async def test_total_timeout_ends_a_steady_stream_with_an_error_event_on_time(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, upstream__stream_idle_timeout=5, upstream__first_byte_timeout=5, upstream__total_timeout=0.5
    )
    fake.script.chunks, fake.script.delay_chunks = 20, 0.1  # 2 s in all, never quiet
    t0 = time.monotonic()
    status, _, data = await post(running.url + "/v1/chat/completions", {**CHAT, "stream": True})
    elapsed = time.monotonic() - t0
    assert status == 200 and b"[DONE]" not in data and 0.45 <= elapsed <= 1.0
    last = orjson.loads(data.rstrip(b"\n").split(b"\n\n")[-1].split(b"data: ", 1)[1])["error"]
    assert last["code"] == "upstream_timeout" and "total" in last["message"]
    assert 2 <= data.count(b"tok") <= 7
    row = running.rows[-1]
    assert row["outcome"] == "upstream_timeout" and row["completion_tokens"] == data.count(b"tok")
    async with aiohttp.ClientSession() as session, session.get(running.url + "/metrics") as r:
        metrics = await r.text()
    assert 'sidecar_upstream_errors_total{reason="timeout_total"} 1.0' in metrics
    await wait_for(lambda: fake.last().closed_at is not None, 2)  # the upstream stopped generating


async def test_total_timeout_cuts_a_whole_answer_with_a_504(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__first_byte_timeout=5, upstream__total_timeout=0.3)
    fake.script.delay_headers = 1.0
    status, _, body = await post(running.url + "/v1/chat/completions", CHAT)
    assert status == 504 and "total" in orjson.loads(body)["error"]["message"]
    assert running.rows[-1]["outcome"] == "upstream_timeout"


def test_the_upstream_keepalive_is_below_model_servers_idle_timeout():
    """uvicorn (vLLM, SGLang) closes idle connections after 5 s: reusing one it is closing loses a request."""
    from sidecar.config import UpstreamCfg

    assert UpstreamCfg().keepalive_timeout < 5


async def test_upstream_500_is_passed_through_and_recorded(fake, sidecar):
    fake.script.status = 500
    status, _, body = await post(sidecar.url + "/v1/chat/completions", CHAT)
    assert status == 500 and orjson.loads(body)["error"]["message"] == "fake failure"
    assert sidecar.rows[-1]["outcome"] == "upstream_error" and sidecar.rows[-1]["upstream_status"] == 500


async def test_mid_stream_drop_gives_an_error_event_not_done(fake, sidecar):
    fake.script.chunks, fake.script.drop_after = 10, 3
    status, _, data = await post(sidecar.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200 and b"[DONE]" not in data
    assert b'"code":"upstream_dropped"' in data
    row = sidecar.rows[-1]
    assert row["outcome"] == "upstream_error" and row["error_code"] == "upstream_dropped"
    assert row["completion_tokens"] == 3 and row["usage_source"] == "counted"


async def test_unknown_and_tricky_paths_are_404_and_never_forwarded(fake, sidecar):
    async with aiohttp.ClientSession() as s:
        for path in (
            "/v1/unknown",
            "/v1/chat/completions/",
            "/V1/chat/completions",
            "/v1//chat/completions",
            "/v1/chat%2Fcompletions",
            "/foo",
        ):
            async with s.post(sidecar.url + path, json=CHAT) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "unknown_url"
                assert "x-request-id" in r.headers
        async with s.delete(sidecar.url + "/v1/chat/completions") as r:
            assert r.status == 405 and r.headers["allow"] == "POST"
    assert fake.received == []


async def test_query_string_is_forwarded_on_canonical_paths(fake, sidecar):
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/v1/models?x=1") as r:
        assert r.status == 200
    assert fake.last().path == "/v1/models" and fake.last().query == "x=1"


async def test_extra_allowlisted_path(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, upstream__extra_paths="/v1/rerank")
    status, _, body = await post(running.url + "/v1/rerank", {"model": "m", "query": "q"})
    assert status == 200 and orjson.loads(body) == SHAPED_ANSWERS["/v1/rerank"]  # the fake's answer, unchanged


async def test_body_over_limit_is_413_and_not_forwarded(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__max_body_bytes=1000)
    status, _, body = await post(running.url + "/v1/chat/completions", {**CHAT, "pad": "x" * 2000})
    assert status == 413 and orjson.loads(body)["error"]["type"] == "invalid_request_error"
    assert fake.received == []


async def test_invalid_json_is_400_and_not_forwarded(fake, sidecar):
    async with aiohttp.ClientSession() as s:
        for raw in (b"{not json", b"[1,2]", b"", b'{"model": 5}', b'{"stream": "yes"}', b"[" * 100 + b"]" * 100):
            async with s.post(
                sidecar.url + "/v1/chat/completions", data=raw, headers={"content-type": "application/json"}
            ) as r:
                assert r.status == 400, raw
                assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert fake.received == []
    assert {row["outcome"] for row in sidecar.rows} == {"bad_request"}


async def test_compressed_request_body_is_refused(fake, sidecar):
    async with (
        aiohttp.ClientSession() as s,
        s.post(sidecar.url + "/v1/chat/completions", data=b"\x1f\x8b...", headers={"content-encoding": "gzip"}) as r,
    ):
        assert r.status == 415
    assert fake.received == []


async def test_concurrent_streams_share_one_pool(fake, sidecar):
    fake.script.chunks, fake.script.delay_chunks = 5, 0.01
    results = await asyncio.gather(
        *(post(sidecar.url + "/v1/chat/completions", {**CHAT, "stream": True}) for _ in range(20))
    )
    for status, headers, data in results:
        assert status == 200 and data == fake.sent[headers["x-request-id"]].replace(
            next(e for e in fake.sent[headers["x-request-id"]].split(b"\n\n") if b'"choices":[]' in e) + b"\n\n", b""
        )
    assert len(sidecar.rows) == 20


async def test_finished_requests_leave_no_timers_or_tasks_behind(fake, sidecar):
    import gc

    from sidecar.upstream.deadline import Deadline

    fake.script.chunks = 3
    for body in (CHAT, {**CHAT, "stream": True}):
        for _ in range(20):
            await post(sidecar.url + "/v1/chat/completions", body)
    gc.collect()
    # type(), not isinstance(): a lazy proxy another test imported (anthropic's GoogleAuthProxy) imports a
    # missing module when its __class__ is asked for
    assert [o for o in gc.get_objects() if type(o) is Deadline] == []
    assert not sidecar.server.app[__import__("sidecar.app").app.PROXY].in_flight.tasks


async def test_connect_timeout_is_a_fast_502(sidecar_factory):
    """An upstream whose accept queue is full drops our SYNs: the connect times out, the client gets a 502."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue; later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))  # non-blocking: EINPROGRESS is expected
        fillers.append(s)
    try:
        running = await sidecar_factory(f"http://127.0.0.1:{port}/v1", upstream__connect_timeout=0.3)
        started = time.monotonic()
        status, _, body = await post(running.url + "/v1/chat/completions", CHAT)
        assert status == 502 and orjson.loads(body)["error"]["code"] == "upstream_unreachable"
        assert time.monotonic() - started < 2.0
    finally:
        for s in fillers:
            s.close()
        listener.close()
