"""Query and body parameters of the JSON routes (admin API, `/v1/usage`): checked, each a 400 when it is off."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from sidecar.config import duration
from sidecar.edge import read_body
from sidecar.errors import BadRequest
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


def parse_instant(raw: str, param: str, now: float | None = None) -> float:
    """A point in time as people write it: epoch seconds, a duration back from now (`24h`, `7d`), or an ISO
    date or date-time (`2026-11-01`, `2026-11-01T09:30`, with an offset or `Z`; without one, UTC)."""
    now = time.time() if now is None else now
    text = raw.strip()
    value = _epoch(text)
    if value is None:
        value = _iso(text)
    if value is None and (seconds := duration(text)) is not None:
        value = now - seconds
    if value is None or not math.isfinite(value):
        raise BadRequest(
            f"`{param}` must be epoch seconds, a duration back from now such as 24h, or a date such as 2026-11-01.",
            param=param,
        )
    return value


def _epoch(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _iso(text: str) -> float | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def time_param(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    return None if raw is None else parse_instant(raw, name)


def only_params(request: web.Request, allowed: Iterable[str]) -> None:
    """A query parameter a route does not know is refused, never silently ignored (a typo'd filter would
    otherwise return everything)."""
    known = set(allowed)
    for name in request.query:
        if name not in known:
            raise BadRequest(f"Unknown query parameter `{name}`.", param=name, code="unknown_parameter")


def since_param(request: web.Request, max_days: int, default_seconds: float = 86400.0) -> float:
    """`since` (see `parse_instant`; default `default_seconds` back), at most `max_days` back."""
    raw = request.query.get("since")
    now = time.time()
    if raw is None:
        return now - default_seconds
    value = parse_instant(raw, "since", now)
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
        since=time_param(request, "since"),
        until=time_param(request, "until"),
        limit=int_param(request, "limit", 100, 1, MAX_PAGE),
        before=before,
        request_id=request.query.get("request_id"),
        model=request.query.get("model"),
    )


def page(rows: list[dict[str, Any]], limit: int, time_col: str, id_col: str = "request_id") -> dict[str, Any]:
    nxt = f"{rows[-1][time_col]}:{rows[-1][id_col]}" if len(rows) == limit else None
    return {"object": "list", "data": rows, "next_before": nxt}
