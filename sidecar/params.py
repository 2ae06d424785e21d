"""Query and body parameters of the JSON routes (admin API, `/v1/usage`): checked, each a 400 when it is off."""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from aiohttp import web

from sidecar.edge import read_body
from sidecar.errors import BadRequest
from sidecar.keys import parse_duration
from sidecar.store.base import RequestQuery

MAX_PAGE = 1000


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await read_body(request))
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("The JSON body must be an object.", code="invalid_body")
    return doc


_INT64 = 2**63 - 1


def int_param(request: web.Request, name: str, default: int | None, low: int = 0, high: int = _INT64) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if len(raw) <= 20 else None
    except ValueError:
        value = None
    if value is None:
        raise BadRequest(f"`{name}` must be an integer.", param=name)
    if value < low or value > high:
        raise BadRequest(f"`{name}` is out of range.", param=name)
    return value


def float_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"`{name}` must be epoch seconds.", param=name)
    return value


def since_param(request: web.Request, max_days: int, default_seconds: float = 86400.0) -> float:
    """`since` as epoch seconds, or a duration back from now (`24h`, `7d`), at most `max_days` back."""
    raw = request.query.get("since")
    now = time.time()
    if raw is None:
        return now - default_seconds
    try:
        value = float(raw)
    except ValueError:
        value = now - parse_duration(raw, "since")
    if not math.isfinite(value):
        raise BadRequest("`since` must be epoch seconds or a duration such as 24h.", param="since")
    if value < now - max_days * 86400:
        raise BadRequest(f"`since` may reach back at most {max_days} days (store.report_max_days).", param="since")
    return value


def page_query(request: web.Request) -> RequestQuery:
    cursor = request.query.get("before")
    before = None
    if cursor:
        at, _, rid = cursor.partition(":")
        try:
            when = float(at)
        except ValueError:
            when = math.nan
        if not math.isfinite(when):
            raise BadRequest("`before` must be a cursor from a previous page.", param="before")
        before = (when, rid)
    return RequestQuery(
        key_id=request.query.get("key_id"),
        outcome=request.query.get("outcome"),
        since=float_param(request, "since"),
        until=float_param(request, "until"),
        limit=int_param(request, "limit", 100, 1, MAX_PAGE),
        before=before,
        request_id=request.query.get("request_id"),
    )


def page(rows: list[dict[str, Any]], limit: int, time_col: str, id_col: str = "request_id") -> dict[str, Any]:
    nxt = f"{rows[-1][time_col]}:{rows[-1][id_col]}" if len(rows) == limit else None
    return {"object": "list", "data": rows, "next_before": nxt}
