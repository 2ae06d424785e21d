"""JSON answers: a document or an OpenAI-shaped error (Anthropic-shaped to a Messages client), with the
request's id (every route's, proxied or not)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from sidecar.errors import SidecarError, anthropic_body


def json_response(doc: Any, request_id: str, status: int = 200) -> web.Response:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers)


def error_response(
    err: SidecarError, request_id: str, extra: Mapping[str, str] | None = None, anthropic: bool = False
) -> web.Response:
    headers = {**err.headers, **(extra or {}), "x-request-id": request_id, "content-type": "application/json"}
    body = anthropic_body(err) if anthropic else err.body()
    return web.Response(status=err.status, body=body, headers=headers)
