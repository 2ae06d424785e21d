"""Call: what the proxy learns from one request before it goes upstream (pure, no I/O).

`parse(method, route, body)` reads the JSON body of a request on a route whose family is JSON, whatever its
Content-Type says (llama-server and vLLM parse it as JSON regardless, so a label cannot hide a body from the
limits), and extracts the model, the streaming flag, the output budget, how many answers it asks for (`n`,
`best_of`, the prompts of a batch) and whether the client asked for a usage chunk. `/invocations` is read as
the family its body selects, by vLLM's own rule. Only what the proxy must reason about is checked
(`BadRequest` with the field in `param`); the rest is the upstream's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

from sidecar.errors import BadRequest
from sidecar.wire.routes import (
    BUDGET_FIELDS,
    CAP_FIELD,
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    FAMILIES,
    GENERATE,
    INVOCATIONS,
    JSON_FAMILIES,
    NATIVE,
    OTHER,
    POOLING,
    RERANK,
    RESPONSES,
    STREAMING,
    USAGE_OPTION,
    Route,
)

MAX_TOKENS_CEILING = 10_000_000
# A key's class as vLLM's `priority` (lower is scheduled earlier, and preempted later). `normal` is vLLM's own
# default, 0: requests that reach vLLM without the sidecar rank with normal keys, and a deployment of normal keys
# only forwards nothing vLLM without priority scheduling would refuse. The gaps leave room for a client to order
# its own requests within its class (a `high` key's 5 still runs before a `low` key's).
ENGINE_PRIORITY = {"high": -10, "normal": 0, "low": 10}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Tuples: `int | float` in isinstance builds a union object on every call, and these run on every request.
_NUMBER = (int, float)
_PROMPT = (str, list, dict)


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
    answers: int = 1  # answers generated: `n` (or `best_of`, when larger) for each prompt of a batch
    cap: int | None = None  # an output cap the proxy writes into the forwarded body (limits.enforce_max_tokens)
    fields: tuple[tuple[str, object], ...] = ()  # top-level fields the proxy sets in the forwarded body

    def capped(self, cap: int) -> Call:
        """This call with `cap` written into its forwarded body as the output budget it did not name."""
        return replace(self, cap=cap, max_tokens=cap)

    def with_fields(self, **fields: object) -> Call:
        """This call with `fields` set in its forwarded body, replacing what the client sent there."""
        return replace(self, fields=self.fields + tuple(fields.items()))

    @property
    def wants_hidden_usage(self) -> bool:
        """A stream whose client did not ask for the usage chunk: the proxy asks for it and hides it."""
        return self.stream and not self.client_usage and self.family in USAGE_OPTION

    def upstream_body(self) -> bytes:
        """The body sent upstream: the client's bytes, or with `include_usage` added when we need usage, the
        output cap written when the proxy enforces one and the proxy's own `fields` set."""
        if (not self.wants_hidden_usage and self.cap is None and not self.fields) or self.doc is None:
            return self.body
        doc = dict(self.doc)
        doc.update(self.fields)
        if self.wants_hidden_usage:
            options = doc.get("stream_options")
            doc["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if self.cap is not None:
            field = CAP_FIELD[self.family]
            if self.family == GENERATE:
                params = doc.get("sampling_params")
                doc["sampling_params"] = {**(params if isinstance(params, dict) else {}), field: self.cap}
            else:
                doc[field] = self.cap
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


def parse(method: str, path: str | Route, body: bytes, max_depth: int = 64) -> Call:
    """What the proxy needs to know of a request. The bodies of the routes whose family is JSON are parsed as
    JSON whatever their Content-Type (a body that is not JSON there is a 400 before the upstream); any other
    route's body (an upload, an unknown route) is passed on untouched. Of a JSON body, only what the proxy
    reasons about is checked: `model` (a string, no control characters), `stream` (a boolean), the output
    budget and the answer counts (numbers or null). Everything else is the upstream's to judge."""
    route = path if isinstance(path, Route) else Route(path, ("POST",), FAMILIES.get(path, OTHER))
    if method != "POST" or route.family not in JSON_FAMILIES:
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
    family = invocation_family(doc) if route.family == INVOCATIONS else route.family
    model = doc.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise BadRequest(
            "`model` must be a non-empty string of at most 256 characters.", param="model", code="invalid_value"
        )
    if model is not None and _CONTROL.search(model):
        raise BadRequest("`model` must not contain control characters.", param="model", code="invalid_value")
    if family == RESPONSES:
        _refuse_background(doc)
    stream = _flag(doc, "stream") and family in STREAMING
    tools = bool(doc.get("tools") or doc.get("functions"))
    usage = _client_usage(doc) if family in USAGE_OPTION else False
    budget = _budget(doc, family)
    return Call(route.path, body, doc, model, stream, budget, usage, tools, family, _answers(doc, family))


def invocation_family(doc: dict[str, Any]) -> str:
    """The family an `/invocations` body stands for, by vLLM's rule (the first request type its body
    validates as: chat, completion, embedding, then scoring and pooling)."""
    if "messages" in doc:
        return CHAT
    if "prompt" in doc:
        return COMPLETIONS
    if "input" in doc:
        return EMBEDDINGS
    if "query" in doc or "text_1" in doc or "queries" in doc:
        return RERANK
    return POOLING


def forwarded_priority(doc: dict[str, Any], floor: int) -> int:
    """The `priority` forwarded for a request whose key's class is `floor` (`ENGINE_PRIORITY`): the client's own
    integer when it is later than its class (a client may yield, never jump its class), else the class's. An
    integer is required (400 otherwise): what the upstream would make of anything else is not ours to guess, and
    a number too large for a 64-bit integer arrives as a float."""
    value = doc.get("priority")
    if value is None:
        return floor
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("`priority` must be an integer.", param="priority", code="invalid_type")
    return max(value, floor)


def _answers(doc: dict[str, Any], family: str) -> int:
    """How many answers the request makes the upstream generate: `n` or `best_of` (the larger: vLLM
    generates `best_of` to return `n`) times the prompts of a batch (`prompt` as a list of strings or of
    token-id lists; SGLang's `text` or `input_ids` lists)."""
    where = doc.get("sampling_params") if family == GENERATE else doc
    per_prompt = max(_count(where, "n"), _count(where, "best_of")) if isinstance(where, dict) else 1
    return per_prompt * _prompts(doc, family)


def _count(where: dict[str, Any], name: str) -> int:
    value = where.get(name)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        raise BadRequest(f"`{name}` must be a number.", param=name, code="invalid_type")
    return min(int(value), MAX_TOKENS_CEILING) if value >= 1 else 1  # below 1: the upstream refuses it


def _prompts(doc: dict[str, Any], family: str) -> int:
    if family in (COMPLETIONS, NATIVE):
        batch = doc.get("prompt")
    elif family == GENERATE:
        batch = doc.get("text", doc.get("input_ids"))
    else:
        return 1
    if isinstance(batch, list) and batch and all(isinstance(p, _PROMPT) for p in batch):
        return len(batch)  # a list of prompts (a list of plain ids is one prompt)
    return 1


def _flag(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"`{name}` must be a boolean.", param=name, code="invalid_type")
    return value


def _budget(doc: dict[str, Any], family: str) -> int | None:
    """The output budget the request names, for the reservation: a positive integer (or a float that is one),
    0 when it asks for no output, else None (no cap named: `Limits.reserve` says what is reserved). Of chat's
    two fields (`max_completion_tokens`, then `max_tokens`), the first that is neither null nor 0 counts, as
    vLLM reads them; llama-server's `n_predict` counts whenever it is there. Any number, and null, goes on to
    the upstream as it is (llama-server takes -1 for "no limit": no cap); a type no budget can have (a string,
    a boolean, an object) is a 400, since the proxy cannot reason about it."""
    where = doc.get("sampling_params") if family == GENERATE else doc
    if not isinstance(where, dict):
        return None
    zero = False
    for name in BUDGET_FIELDS.get(family, ()):
        value = where.get(name)
        if value is None or (family == CHAT and value == 0 and not isinstance(value, bool)):
            zero = zero or value == 0
            continue  # absent; or, in a chat, null or 0: the next field names the budget (vLLM's `a or b`)
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise BadRequest(f"`{name}` must be a number.", param=name, code="invalid_type")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 300.0 is 300 to the upstream's validation (pydantic's int accepts it)
        if isinstance(value, int) and value >= 0:
            return min(value, MAX_TOKENS_CEILING)
        return None  # negative (llama-server's -1: no limit) or fractional (the upstream refuses it)
    return 0 if zero else None


def _refuse_background(doc: dict[str, Any]) -> None:
    """A Responses request with `background: true` is refused: vLLM and SGLang answer it at once, `queued` and
    without usage, generate later, and hand the result to `GET /v1/responses/{id}`, a read that is not charged
    (`wire.routes.STORED`): the generation would be free. Anything but a boolean is refused too, since the
    upstream's validation reads `"true"` or `1` as true."""
    value = doc.get("background")
    if value is None or value is False:
        return
    if value is True:
        raise BadRequest(
            "`background` is not supported through this proxy: a background response is generated after its "
            "request is settled, so its usage could not be charged. Send the request without it.",
            param="background",
            code="unsupported_parameter",
        )
    raise BadRequest("`background` must be a boolean.", param="background", code="invalid_type")


def _client_usage(doc: dict[str, Any]) -> bool:
    options = doc.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object.", param="stream_options", code="invalid_type")
    return options.get("include_usage") is True
