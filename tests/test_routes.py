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
from sidecar.wire.routes import METHODS, PRESETS, RouteError, build, parse_entry
from tests.support.fake_upstream import SHAPED_ANSWERS
from tests.support.waits import free_port

# (prompt, completion) each answer shape carries; None: no usage in it (recorded as usage_source "none").
USAGE: dict[str, tuple[int, int] | None] = {
    "/v1/chat/completions": (11, 5),
    "/v1/responses": (11, 5),
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
    "/v1/messages": (12, 2),
    "/v1/messages/count_tokens": (12, 0),
    "/v1/audio/translations": (300, 40),  # not read, but the answer says its usage
    "/invocations": (11, 5),  # a chat body: read as the chat it stands for (the fake answers it as one)
}
UPLOADS = ("/v1/audio/transcriptions",)  # not read, no usage in the answer: charged the reserved minimum
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi", "text": "hi"}


@pytest.mark.parametrize("kind", ["openai", "vllm", "llama.cpp", "sglang"])
async def test_every_route_of_a_preset(fake, sidecar_factory, kind):
    running = await sidecar_factory(fake.url, upstream__kind=kind)
    table = build(kind, ())
    expected: dict[str, tuple[str, tuple[int, int] | None]] = {}
    async with aiohttp.ClientSession() as s:
        for path, route in sorted(table.items()):
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
                        assert (await r.json())["error"]["code"] == "method_not_allowed"
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


async def test_admin_surfaces_are_in_no_preset(fake, sidecar_factory):
    admin = ["/slots", "/slots/0", "/lora-adapters", "/metrics", "/props", "/v1/load_lora_adapter", "/sleep"]
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
