"""JSON answers: a document or an OpenAI-shaped error, with the request's id (every route's, proxied or not)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from sidecar.errors import SidecarError


def json_response(doc: Any, request_id: str, status: int = 200) -> web.Response:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers)


def error_response(err: SidecarError, request_id: str, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = {**err.headers, **(extra or {}), "x-request-id": request_id, "content-type": "application/json"}
    return web.Response(status=err.status, body=err.body(), headers=headers)
