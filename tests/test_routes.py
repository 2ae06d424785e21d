"""The route table: every preset route family through a real sidecar to the fake upstream (each allowed method
forwarded, every other one a 405 with `Allow`, usage recorded where the answer carries it), the operator's own
routes, and the table's refusals."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from sidecar.config import ConfigError, load
from sidecar.ops.metrics import Metrics
from sidecar.wire.routes import METHODS, PRESETS, RouteError, build, parse_entry
from tests.support.fake_upstream import SHAPED_ANSWERS
from tests.support.waits import free_port

# (prompt, completion) each answer shape carries; None: no usage in it (recorded as usage_source "none").
USAGE: dict[str, tuple[int, int] | None] = {
    "/v1/chat/completions": (11, 5),
    "/v1/responses": (11, 5),
    "/responses": (11, 5),  # llama-server serves the Responses API on both paths
    "/v1/completions": (11, 5),
    "/v1/embeddings": (3, 0),
    "/completion": (7, 2),
    "/completions": (7, 2),
    "/infill": (5, 1),
    "/generate": (6, 3),
    "/tokenize": (4, 0),
    "/v1/rerank": (9, 0),
    "/rerank": (9, 0),
    "/v2/rerank": (9, 0),
    "/reranking": (9, 0),
    "/v1/reranking": (9, 0),
    "/score": (8, 0),
    "/v1/score": (8, 0),
    "/pooling": (4, 0),
    "/classify": (4, 0),
    "/encode": (4, 0),
    "/embeddings": (3, 0),
    "/chat/completions": (5, 2),
    "/v1/messages": (11, 5),
    "/v1/messages/count_tokens": (12, 0),
    "/v1/audio/translations": (300, 40),  # not read, but the answer says its usage
    "/invocations": (11, 5),  # a chat body: read as the chat it stands for (the fake answers it as one)
}
UPLOADS = (
    "/v1/audio/transcriptions",
    "/audio/transcriptions",
)  # not read, no usage in the answer: charged the reserved minimum
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "text": "hi"}


@pytest.mark.parametrize("kind", ["openai", "vllm", "llama.cpp", "sglang"])
async def test_every_route_of_a_preset(fake, sidecar_factory, kind):
    running = await sidecar_factory(fake.url, upstream__kind=kind)
    table = build(kind, ())
    expected: dict[str, tuple[str, tuple[int, int] | None]] = {}
    async with aiohttp.ClientSession() as s:
        for template, route in sorted(table.items()):
            path = template.replace("{id}", "resp_123")  # a template's route, by a path it matches
            for method in sorted(METHODS):
                data = orjson.dumps(BODY) if method == "POST" else None
                headers = {"content-type": "application/json"} if data else {}
                async with s.request(method, running.url + path, data=data, headers=headers) as r:
                    if method in route.methods:
                        assert r.status == 200, (path, method, await r.text())
                        if path != "/health":  # the fake's own health handler keeps no record
                            assert fake.last().path == path and fake.last().method == method
                        expected[r.headers["x-request-id"]] = (path, USAGE.get(path) if method == "POST" else None)
                    else:
                        assert r.status == 405, (path, method)
                        assert r.headers["allow"] == route.allow
                        error = (await r.json())["error"]  # Anthropic's shape on its paths (no `code`)
                        assert error.get("code", "method_not_allowed") == "method_not_allowed"
                        assert ("code" in error) != path.startswith("/v1/messages"), (path, error)
    rows: dict = {}
    for _ in range(200):  # the 405s have rows too (within the per-source rate): wait for the forwarded ones
        rows = {r["request_id"]: r for r in await running.stored()}
        if set(expected) <= set(rows):
            break
        await asyncio.sleep(0.05)
    for rid, (path, usage) in expected.items():
        row = rows[rid]
        if path in UPLOADS and row["method"] == "POST":
            assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (1024, 0, "reserved")
        elif usage is None:
            assert row["usage_source"] == "none" and row["prompt_tokens"] is None, (path, row)
        else:
            assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (*usage, "upstream"), path


# Routes each server registers today that the presets once missed, and the family each is read as.
TODAYS = {
    "vllm": {"POST /v1/messages": "messages", "POST /v1/messages/count_tokens": "tokenize",
             "POST /v1/chat/completions/render": "tokenize", "POST /v1/completions/render": "tokenize",
             "GET /v1/responses/{id}": "stored", "POST /v1/responses/{id}/cancel": "stored"},
    "llama.cpp": {"POST /v1/responses": "responses", "POST /responses": "responses",
                  "POST /v1/responses/input_tokens": "tokenize", "POST /responses/input_tokens": "tokenize",
                  "POST /v1/chat/completions/input_tokens": "tokenize",
                  "POST /chat/completions/input_tokens": "tokenize",
                  "POST /v1/audio/transcriptions": "other", "POST /audio/transcriptions": "other"},
    "sglang": {"POST /v1/tokenize": "tokenize", "POST /v1/detokenize": "tokenize", "POST /tokenize": "tokenize",
               "POST /v1/classify": "pooling", "POST /invocations": "invocations",
               "GET /v1/responses/{id}": "stored", "POST /v1/responses/{id}/cancel": "stored"},
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TODAYS))
def test_presets_carry_todays_routes(kind):
    table = build(kind, ())
    for entry, family in TODAYS[kind].items():
        method, path = entry.split(" ")
        assert method in table[path].methods and table[path].family == family, entry


async def test_admin_surfaces_are_in_no_preset(fake, sidecar_factory):
    admin = ["/slots", "/slots/0", "/lora-adapters", "/metrics", "/props", "/v1/load_lora_adapter", "/sleep",
             "/wake_up", "/cors-proxy", "/tools", "/v1/chat/completions/control", "/v1/stream/c1", "/v1/streams",
             "/reset_prefix_cache", "/start_profile", "/update_weights_from_disk", "/flush_cache", "/abort_request",
             "/get_server_info", "/models/load", "/pause"]  # fmt: skip
    for kind in PRESETS:
        table = build(kind, ())
        assert not {p for p in admin if p != "/props"} & set(table), kind
        assert "POST" not in table.get("/props", build("custom", ("GET /props",))["/props"]).methods
    running = await sidecar_factory(fake.url, upstream__kind="llama.cpp")
    async with aiohttp.ClientSession() as s:
        for path in admin[:3]:
            async with s.post(running.url + path, json={}) as r:
                assert r.status == 404, path
    assert fake.received == []


async def test_operator_routes_add_methods_and_paths(fake, sidecar_factory):
    running = await sidecar_factory(
        fake.url, upstream__kind="openai", upstream__routes=["GET,POST /v1/models", "POST /slots/0", "GET /props"]
    )
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/v1/models"), ("GET", "/v1/models"), ("POST", "/slots/0"), ("GET", "/props")):
            async with s.request(method, running.url + path, json={} if method == "POST" else None) as r:
                assert r.status == 200, (method, path)
        async with s.post(running.url + "/tokenize", json={}) as r:
            assert r.status == 404  # not in the openai preset, not added
        for path in ("/PROPS", "/props/", "//props", "/./props", "/%70rops"):
            async with s.get(URL(running.url + path, encoded=True)) as r:  # sent as written
                assert r.status == 404, path


TEMPLATES = ("GET /v1/responses/{id}", "POST /v1/responses/{id}/cancel", "POST /v1/responses/input_tokens")


def test_a_template_segment_takes_one_plain_segment_and_an_exact_path_wins():
    table = build("custom", TEMPLATES)
    assert table.match("/v1/responses/resp_123") is table["/v1/responses/{id}"]
    assert table.match("/v1/responses/resp-1.2_x~y/cancel") is table["/v1/responses/{id}/cancel"]
    assert table.match("/v1/responses/input_tokens") is table["/v1/responses/input_tokens"]  # exact, not {id}
    refused = ["/v1/responses/..", "/v1/responses/.", "/v1/responses/%2e%2e", "/v1/responses/%2e", "/v1/responses/",
               "/v1/responses//cancel", "/v1/responses/a/b", "/v1/responses/a/cancel/x", "/v1/responses/a/cancel/",
               "/V1/responses/a", "/v1/Responses/a", "/v1/responses/a/CANCEL", "/v1/responses/a%2Fb",
               "/v1/responses/a;b", "/v1/responses/a\\b", "/v1/responses/é", "/v1/responses/{id}", "v1/responses/a",
               "/v1/responses", "/x/responses/a"]  # fmt: skip
    for path in refused:
        assert table.match(path) is None, path
    # a path of a template is counted under its template: the metric labels stay bounded
    metrics = Metrics(table, table.match)
    assert metrics.route("/v1/responses/resp_9") == "/v1/responses/{id}" and metrics.route("/v1/x/y") == "other"


def test_the_same_template_under_two_names_is_one_route():
    table = build("vllm", ("DELETE /v1/responses/{response_id}",))
    assert table.match("/v1/responses/r1").allow == "GET, DELETE"  # type: ignore[union-attr]
    assert table.match("/v1/responses/r1").family == "stored"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "entry",
    ["GET /v1/responses/{}", "GET /v1/responses/{a", "GET /v1/responses/a}", "GET /v1/responses/x{id}",
     "GET /v1/responses/{id}x", "GET /v1/responses/{a-b}", "GET /v1/responses/{{id}}", "GET /{id}", "GET /{id}/x",
     "GET /v1/{id}", "GET /admin/{id}", "POST /console/{id}/x", "GET /v1/responses/{id}/../x"],
)  # fmt: skip
def test_bad_templates_are_refused(entry):
    with pytest.raises(RouteError):
        parse_entry(entry)


def test_a_bad_template_stops_the_start_with_one_line():
    from sidecar.runner import Server

    for entry in ("GET /v1/responses/{id", "GET /v1/{id}"):
        settings = load(None, {}, {"upstream.url": "http://127.0.0.1:1/v1", "upstream.routes": [entry]})
        with pytest.raises(ConfigError) as raised:
            Server(settings)
        assert str(raised.value).startswith("upstream.routes:") and "\n" not in str(raised.value)


async def test_a_stored_response_is_read_back_through_its_template_and_not_charged_again(fake, sidecar_factory):
    """vLLM's `GET /v1/responses/{id}` (whole or resumed as a stream) and `POST .../cancel` reach the upstream;
    the usage a stored response shows was charged when it was made. Paths the templates do not take are 404s
    that never reach it, and a method they do not take is a 405 with `Allow`."""
    reached: list[tuple[str, str]] = []
    usage = {"input_tokens": 11, "output_tokens": 5, "total_tokens": 16}

    async def stored(request):
        if request.path == "/v1/models":  # the sidecar's own model list fetch
            return web.json_response({"object": "list", "data": []})
        reached.append((request.method, request.raw_path))
        if request.query.get("stream") == "true":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            event = {"type": "response.completed", "response": {"id": "resp_123", "usage": usage}}
            await resp.write(b"event: response.completed\ndata: " + orjson.dumps(event) + b"\n\n")
            return resp
        return web.json_response({"id": "resp_123", "object": "response", "status": "completed", "usage": usage})

    fake.handler = stored
    running = await sidecar_factory(fake.url, upstream__kind="vllm")
    ids = []
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/v1/responses/resp_123"), ("GET", "/v1/responses/resp_123?stream=true"),
                             ("POST", "/v1/responses/resp_123/cancel")):  # fmt: skip
            async with s.request(method, running.url + path) as r:
                assert r.status == 200, (method, path, await r.text())
                ids.append(r.headers["x-request-id"])
                await r.read()
        assert reached == [("GET", "/v1/responses/resp_123"), ("GET", "/v1/responses/resp_123?stream=true"),
                           ("POST", "/v1/responses/resp_123/cancel")]  # fmt: skip
        for path in ("/v1/responses/a/b", "/v1/responses/%2e%2e", "/v1/responses/..", "/v1/responses/",
                     "/v1/responses/a%2Fb", "/V1/responses/a", "/v1/responses/a/cancel/"):  # fmt: skip
            async with s.get(URL(running.url + path, encoded=True)) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "unknown_url"
        async with s.delete(running.url + "/v1/responses/resp_123") as r:
            assert r.status == 405 and r.headers["allow"] == "GET"
        async with s.get(running.url + "/v1/responses/resp_123/cancel") as r:
            assert r.status == 405 and r.headers["allow"] == "POST"
    assert len(reached) == 3  # nothing refused reached the upstream
    rows: dict = {}
    for _ in range(200):  # the refused requests have rows too: wait for the forwarded ones
        rows = {r["request_id"]: r for r in await running.stored()}
        if set(ids) <= set(rows):
            break
        await asyncio.sleep(0.05)
    for rid in ids:
        assert rows[rid]["usage_source"] == "none" and rows[rid]["prompt_tokens"] is None, rows[rid]


@pytest.mark.parametrize(
    "entry",
    ["/tokenize", "FETCH /x", "POST tokenize", "POST /a/../b", "POST /a//b", "POST /a%2Fb", "POST /healthz",
     "GET /admin/keys", "POST /v1/usage", "POST /a?b", "POST /é"],
)  # fmt: skip
def test_route_entries_that_are_refused(entry):
    with pytest.raises(RouteError):
        parse_entry(entry)


def test_a_bad_route_stops_the_start_with_one_line(tmp_path):
    from sidecar.runner import Server

    settings = load(None, {}, {"upstream.url": "http://127.0.0.1:1/v1", "upstream.routes": ["POST /x/../y"]})
    with pytest.raises(ConfigError) as raised:
        Server(settings)
    assert str(raised.value).startswith("upstream.routes:")
    with pytest.raises(ConfigError):
        load(None, {}, {"upstream.kind": "ollama"})


def test_every_shaped_answer_has_its_expected_usage():
    assert set(SHAPED_ANSWERS) - {"/detokenize", "/apply-template", "/embedding"} <= set(USAGE)


PREFLIGHT = {"origin": "https://app.example", "access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type"}  # fmt: skip


async def test_cors_for_configured_origins(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__cors_origins=["https://app.example"])
    async with aiohttp.ClientSession() as s:
        async with s.options(running.url + "/v1/chat/completions", headers=PREFLIGHT) as r:
            assert r.status == 204
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            assert r.headers["access-control-allow-methods"] == "POST"
            assert r.headers["access-control-allow-headers"] == "authorization, content-type"
            assert r.headers["vary"] == "Origin"
        async with s.options(
            running.url + "/v1/chat/completions", headers={**PREFLIGHT, "origin": "https://evil"}
        ) as r:
            assert r.status == 403 and "access-control-allow-origin" not in r.headers
        async with s.options(running.url + "/nope", headers=PREFLIGHT) as r:
            assert r.status == 404
        # the answer a page reads: ours (a 401 here) carries the CORS headers too, and exposes our headers
        async with s.post(
            running.url + "/v1/chat/completions", json={"model": "m"}, headers={"origin": "https://app.example"}
        ) as r:
            assert r.status == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
            assert "x-request-id" in r.headers["access-control-expose-headers"]
        async with s.post(
            running.url + "/v1/chat/completions", json={"model": "m"}, headers={"origin": "https://evil"}
        ) as r:
            assert "access-control-allow-origin" not in r.headers
    assert fake.received == []  # preflights are answered here


async def test_without_cors_origins_a_preflight_is_refused_here_and_never_reaches_the_upstream(fake, sidecar_factory):
    """A preflight carries no key: relayed, it would reach the upstream with the upstream's own key, outside every
    limit. Without `server.cors_origins` the sidecar does no CORS, so it refuses every preflight itself (403, as
    for an origin not in the list), whether keys are required or not and whether the upstream is up or not; the
    upstream's CORS headers on an answer still reach the client unchanged."""
    keyed = await sidecar_factory(fake.url, auth__enabled=True, upstream__api_key="upstream-key-canary")
    open_ = await sidecar_factory(fake.url, upstream__routes=["GET /props"], upstream__api_key="upstream-key-canary")
    down = await sidecar_factory(f"http://127.0.0.1:{free_port()}/v1", upstream__routes=["GET /props"])
    async with aiohttp.ClientSession() as s:
        for url, path in ((keyed.url, "/v1/chat/completions"), (open_.url, "/props"), (down.url, "/props")):
            async with s.options(url + path, headers=PREFLIGHT) as r:
                assert r.status == 403, (url, path)
                assert (await r.json())["error"]["code"] == "origin_not_allowed"
                assert r.headers["x-request-id"].startswith("req_")
                assert not [name for name in r.headers if name.lower().startswith("access-control-")]
    assert fake.received == []  # nothing reached the upstream, with its key or without

    async def cors_upstream(request):
        return web.json_response({"ok": True}, headers={"access-control-allow-origin": "https://app.example"})

    fake.handler = cors_upstream
    async with aiohttp.ClientSession() as s:
        async with s.get(open_.url + "/props", headers={"origin": "https://app.example"}) as r:
            assert r.status == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    rows = await down.stored(4)  # the three share the test's data dir: one store
    refused = [r for r in rows if r["method"] == "OPTIONS"]
    assert [(r["status"], r["upstream_status"]) for r in refused] == [(403, None)] * 3


async def test_listening_on_several_addresses(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, server__host="127.0.0.1,::1")
    async with aiohttp.ClientSession() as s:
        for host in ("127.0.0.1", "[::1]"):
            async with s.get(f"http://{host}:{running.port}/healthz") as r:
                assert r.status == 200, host
