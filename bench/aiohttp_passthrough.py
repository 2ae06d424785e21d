"""The benchmarks' floor: a minimal aiohttp pass-through reverse proxy (what any aiohttp design costs at least).

One shared ClientSession (keep-alive pool), uvloop, no access log. It checks a bearer key (PROXY_KEY, if set),
forwards method, path, query and body, replaces Authorization with UPSTREAM_KEY, and relays the upstream body
chunk by chunk (iter_any) for SSE; other bodies are read whole. No accounting, no records, no limits.

    PROXY_KEY=sk-... .venv/bin/python bench/aiohttp_passthrough.py --port 18102 --upstream http://127.0.0.1:18100
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length", "authorization"}  # fmt: skip
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM, PROXY_KEY, UPSTREAM_KEY = web.AppKey("upstream", str), web.AppKey("proxy_key", str), web.AppKey("key", str)


async def handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[PROXY_KEY] and request.headers.get("Authorization") != "Bearer " + app[PROXY_KEY]:
        return web.json_response({"error": {"message": "invalid api key", "code": 401}}, status=401)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = "Bearer " + app[UPSTREAM_KEY]
    body = await request.read()
    url = app[UPSTREAM] + request.rel_url.path_qs
    async with app[SESSION].request(request.method, url, headers=headers, data=body) as up:
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        if up.content_type != "text/event-stream":
            return web.Response(status=up.status, body=await up.read(), headers=out)
        resp = web.StreamResponse(status=up.status, headers=out)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as s:
        app[SESSION] = s
        yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18102)
    ap.add_argument("--upstream", default="http://127.0.0.1:18100", help="upstream base URL, without /v1")
    a = ap.parse_args()
    uvloop.install()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = a.upstream.rstrip("/")
    app[PROXY_KEY] = os.environ.get("PROXY_KEY", "")
    app[UPSTREAM_KEY] = os.environ.get("UPSTREAM_KEY", "x")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
