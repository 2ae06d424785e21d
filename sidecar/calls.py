"""Call: what the proxy learns from one request before it goes upstream (pure, no I/O).

`parse(method, path, body)` checks the JSON body of a generation request and extracts the model, the
streaming flag, the output budget and whether the client asked for a usage chunk. Bad input raises
`BadRequest` with the field named in `param`, so nothing malformed ever reaches the upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.errors import BadRequest

STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
USAGE_OPTION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_OUTPUT_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
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

    @property
    def wants_hidden_usage(self) -> bool:
        """A stream whose client did not ask for the usage chunk: the proxy asks for it and hides it."""
        return self.stream and not self.client_usage and self.path in USAGE_OPTION_PATHS

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


def parse(method: str, path: str, body: bytes, max_depth: int = 64) -> Call:
    if method != "POST" or path == "/v1/models" or path.startswith("/v1/models/"):
        return Call(path, body, None)
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
    stream = _flag(doc, "stream")
    tools = bool(doc.get("tools") or doc.get("functions"))
    return Call(path, body, doc, model, stream and path in STREAMING_PATHS, _budget(doc), _client_usage(doc), tools)


def _flag(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be a boolean.", param=name, code="invalid_type")
    return value


def _budget(doc: dict[str, Any]) -> int | None:
    for name in _OUTPUT_BUDGET_FIELDS:
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"`{name}` must be a positive integer.", param=name, code="invalid_type")
        if not 1 <= value <= MAX_TOKENS_CEILING:
            raise BadRequest(f"`{name}` must be between 1 and {MAX_TOKENS_CEILING}.", param=name, code="invalid_value")
        return value
    return None


def _client_usage(doc: dict[str, Any]) -> bool:
    options = doc.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options", code="invalid_type")
    return options.get("include_usage") is True
