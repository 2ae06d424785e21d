"""Call: what the proxy learns from one request before it goes upstream (pure, no I/O).

`parse(method, route, body)` reads the JSON body of a request on a route whose family is JSON and extracts the
model, the streaming flag, the output budget and whether the client asked for a usage chunk. Only what the
proxy must reason about is checked (`BadRequest` with the field in `param`); the rest is the upstream's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import BadRequest
from sidecar.wire.routes import (
    BUDGET_FIELDS,
    CHAT,
    FAMILIES,
    GENERATE,
    JSON_FAMILIES,
    OTHER,
    STREAMING,
    USAGE_OPTION,
    Route,
)

MAX_TOKENS_CEILING = 10_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Call:
    path: str
    body: bytes
    doc: dict[str, Any] | None
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    client_usage: bool = False
    tools: bool = False  # the request declared tools, so the stream may carry tool-call argument deltas
    family: str = OTHER

    @property
    def wants_hidden_usage(self) -> bool:
        """A stream whose client did not ask for the usage chunk: the proxy asks for it and hides it."""
        return self.stream and not self.client_usage and self.family in USAGE_OPTION

    def upstream_body(self) -> bytes:
        """The body sent upstream: the client's bytes, or with `include_usage` added when we need usage."""
        if not self.wants_hidden_usage or self.doc is None:
            return self.body
        doc = dict(self.doc)
        options = doc.get("stream_options")
        doc["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return orjson.dumps(doc)


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when arrays/objects nest deeper than `limit` (a cheap count first: most bodies cannot)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def parse(method: str, path: str | Route, body: bytes, max_depth: int = 64, content_type: str = "") -> Call:
    """What the proxy needs to know of a request. Only JSON bodies of the routes whose family is read as JSON
    are parsed (a multipart upload or an unknown route is passed on untouched); of those, only what the proxy
    reasons about is checked: `model` (a string, no control characters), `stream` (a boolean), the output
    budget (a number or null). Everything else is the upstream's to judge."""
    route = path if isinstance(path, Route) else Route(path, ("POST",), FAMILIES.get(path, OTHER))
    if method != "POST" or route.family not in JSON_FAMILIES or content_type.startswith("multipart/"):
        return Call(route.path, body, None, family=route.family)
    if not body:
        raise BadRequest("The request body is empty; a JSON object is required.", code="invalid_body")
    if json_depth_exceeds(body, max_depth):
        raise BadRequest(f"The JSON body nests deeper than {max_depth} levels.", code="invalid_body")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("The JSON body must be an object.", code="invalid_body")
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise BadRequest(
            "`model` must be a non-empty string of at most 256 characters.", param="model", code="invalid_value"
        )
    if model is not None and _CONTROL.search(model):
        raise BadRequest("`model` must not contain control characters.", param="model", code="invalid_value")
    stream = _flag(doc, "stream") and route.family in STREAMING
    tools = bool(doc.get("tools") or doc.get("functions"))
    usage = _client_usage(doc) if route.family in USAGE_OPTION else False
    return Call(route.path, body, doc, model, stream, _budget(doc, route.family), usage, tools, route.family)


def _flag(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be a boolean.", param=name, code="invalid_type")
    return value


def _budget(doc: dict[str, Any], family: str) -> int | None:
    """The output budget the request names, for the reservation: a positive integer (or a float that is one),
    else None (the default is reserved). Of chat's two fields (`max_completion_tokens`, then `max_tokens`), the
    first that is neither null nor 0 counts, as vLLM reads them; llama-server's `n_predict` counts whenever it
    is there. Any number, and null, goes on to the upstream as it is (llama-server takes -1 for "no limit"); a
    type no budget can have (a string, a boolean, an object) is a 400, since the proxy cannot reason about it."""
    where = doc.get("sampling_params") if family == GENERATE else doc
    if not isinstance(where, dict):
        return None
    for name in BUDGET_FIELDS.get(family, ()):
        value = where.get(name)
        if value is None or (family == CHAT and value == 0 and not isinstance(value, bool)):
            continue  # absent; or, in a chat, null or 0: the next field names the budget (vLLM's `a or b`)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"`{name}` must be a number.", param=name, code="invalid_type")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 300.0 is 300 to the upstream's validation (pydantic's int accepts it)
        if isinstance(value, int) and value > 0:
            return min(value, MAX_TOKENS_CEILING)
        return None
    return None


def _client_usage(doc: dict[str, Any]) -> bool:
    options = doc.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options", code="invalid_type")
    return options.get("include_usage") is True
