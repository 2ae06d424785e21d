"""A second floor: `aiohttp_passthrough.py` with the sidecar's own upstream client (`sidecar.upstream.pool`) in
place of aiohttp's ClientSession. What aiohttp's server plus the sidecar's client cost with nothing else: the
sidecar's pipeline (keys, leases, the row, the access line, metrics) is everything it costs above this.

Same contract as the floor: a bearer key (PROXY_KEY, if set), method, path, query and body forwarded,
Authorization replaced with UPSTREAM_KEY, SSE relayed chunk by chunk, other bodies read whole.

    PROXY_KEY=sk-... .venv/bin/python bench/pool_passthrough.py --port 18103 --upstream http://127.0.0.1:18100
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from sidecar.upstream.pool import ConnectionPool

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "content-length", "authorization"}  # fmt: skip
POOL = web.AppKey("pool", ConnectionPool)
UPSTREAM, PROXY_KEY, UPSTREAM_KEY = web.AppKey("upstream", str), web.AppKey("proxy_key", str), web.AppKey("key", str)


async def handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    if app[PROXY_KEY] and request.headers.get("Authorization") != "Bearer " + app[PROXY_KEY]:
        return web.json_response({"error": {"message": "invalid api key", "code": 401}}, status=401)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
    headers.append(("Authorization", "Bearer " + app[UPSTREAM_KEY]))
    body = await request.read()
    up = await app[POOL].send(request.method, request.rel_url.path_qs, headers, body)
    try:
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        if not up.headers.get("content-type", "").startswith("text/event-stream"):
            return web.Response(status=up.status, body=await up.read(), headers=out)
        resp = web.StreamResponse(status=up.status, headers=out)
        await resp.prepare(request)
        while chunk := await up.readany():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
    finally:
        up.release()  # back to the pool when read to its end, else closed


async def pool(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = ConnectionPool(app[UPSTREAM], max_idle=1024, keepalive_timeout=60.0, connect_timeout=5.0)
    yield
    await app[POOL].close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18103)
    ap.add_argument("--upstream", default="http://127.0.0.1:18100", help="upstream base URL, without /v1")
    a = ap.parse_args()
    uvloop.install()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM] = a.upstream.rstrip("/")
    app[PROXY_KEY] = os.environ.get("PROXY_KEY", "")
    app[UPSTREAM_KEY] = os.environ.get("UPSTREAM_KEY", "x")
    app.cleanup_ctx.append(pool)
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
