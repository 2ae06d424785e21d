"""Usage as every API and server says it, pure (no I/O): a `usage` object of any shape read into one `Usage`
(`usage_from`), the other places an answer keeps it (`usage_of`: llama-server's native timings, SGLang's
`meta_info`, a tokenizer's count, a Responses event's `response`), and a whole JSON body's `usage` object found
from its end without parsing the body (`usage_object`, `UsageFinder` for a body that passes in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an answer reports. `prompt_tokens` means the same on every API: every prompt token the upstream
    processed, read from its cache and written to it included (Anthropic's `input_tokens` leaves both out, so
    they are added back). The details are None when the upstream does not say: never a guess."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None  # prompt tokens served from a cache
    cache_write_tokens: int | None = None  # prompt tokens written to a cache (Anthropic's cache creation)
    reasoning_tokens: int | None = None  # output tokens spent on reasoning

    def over(self, earlier: Usage | None) -> Usage:
        """This usage, with what it leaves unsaid taken from an `earlier` event of the same stream (Anthropic's
        `message_delta` counts only the output; its `message_start` held the input)."""
        if earlier is None:
            return self
        return Usage(
            _first(self.prompt_tokens, earlier.prompt_tokens),
            _first(self.completion_tokens, earlier.completion_tokens),
            _first(self.cached_tokens, earlier.cached_tokens),
            _first(self.cache_write_tokens, earlier.cache_write_tokens),
            _first(self.reasoning_tokens, earlier.reasoning_tokens),
        )


def _first(a: int | None, b: int | None) -> int | None:
    return a if a is not None else b


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _detail(obj: dict[str, Any], names: tuple[str, ...], key: str) -> int | None:
    """`obj[name][key]` for the first of `names` that holds a dict (`prompt_tokens_details.cached_tokens`)."""
    for name in names:
        details = obj.get(name)
        if isinstance(details, dict):
            return _int_or_none(details.get(key))
    return None


_PROMPT_DETAILS = ("prompt_tokens_details", "input_tokens_details")
_OUTPUT_DETAILS = ("completion_tokens_details", "output_tokens_details")


def usage_from(obj: Any) -> Usage | None:
    """Usage from a `usage` object of any API: OpenAI chat/completions/embeddings (`prompt_tokens`,
    `*_details`), the Responses API (`input_tokens`, `*_details`), Anthropic (`input_tokens` plus
    `cache_read_input_tokens` and `cache_creation_input_tokens`, which it counts apart), SGLang's `meta_info`
    (`cached_tokens` at its top); None when absent."""
    if not isinstance(obj, dict):
        return None
    read = _int_or_none(obj.get("cache_read_input_tokens"))
    written = _int_or_none(obj.get("cache_creation_input_tokens"))
    prompt = _int_or_none(obj.get("prompt_tokens", obj.get("input_tokens")))
    if prompt is not None and "prompt_tokens" not in obj and (read is not None or written is not None):
        prompt += (read or 0) + (written or 0)  # Anthropic's input_tokens leaves out the cache's part
    completion = _int_or_none(obj.get("completion_tokens", obj.get("output_tokens")))
    cached = _detail(obj, _PROMPT_DETAILS, "cached_tokens")
    if cached is None:
        cached = read if read is not None else _int_or_none(obj.get("cached_tokens"))
    if written is None:
        written = _detail(obj, _PROMPT_DETAILS, "cache_write_tokens")
    reasoning = _detail(obj, _OUTPUT_DETAILS, "reasoning_tokens")
    if reasoning is None:
        reasoning = _int_or_none(obj.get("reasoning_tokens"))
    if prompt is None and completion is None:
        total = _int_or_none(obj.get("total_tokens"))  # a rerank or score answer: all of it is input
        return Usage(total, 0, cached) if total is not None else None
    if completion is None and "total_tokens" in obj and prompt is not None:
        total = _int_or_none(obj.get("total_tokens"))
        completion = total - prompt if total is not None and total >= prompt else None
    return Usage(prompt, completion, cached, written, reasoning)


def usage_of(obj: Any) -> Usage | None:
    """The usage an answer (or a stream event) carries, in any of the shapes servers use: OpenAI's `usage`
    object (also inside a Responses-API `response` or an Anthropic `message`), llama-server's native
    `tokens_evaluated`/`tokens_predicted`, SGLang's `meta_info`, a tokenizer's `count` (vLLM) or `tokens` list
    (llama-server)."""
    if not isinstance(obj, dict):
        return None
    usage = usage_from(obj.get("usage"))
    if usage is not None:
        return usage
    for wrapper in ("response", "message"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and (usage := usage_from(inner.get("usage"))) is not None:
            return usage
    prompt, completion = _int_or_none(obj.get("tokens_evaluated")), _int_or_none(obj.get("tokens_predicted"))
    if prompt is not None or completion is not None:
        # `tokens_cached` is the slot's whole cache (prompt and output); the prompt's reused part is `cache_n`.
        timings = obj.get("timings")
        cached = _int_or_none(timings.get("cache_n")) if isinstance(timings, dict) else None
        return Usage(prompt, completion, cached)
    meta = obj.get("meta_info")
    if isinstance(meta, dict) and (usage := usage_from(meta)) is not None:
        return usage
    if (usage := usage_from(obj)) is not None:  # counted at the top level (Anthropic's count_tokens)
        return usage
    count = _int_or_none(obj.get("count"))
    if count is None and isinstance(obj.get("tokens"), list):
        count = len(obj["tokens"])
    return Usage(count, 0) if count is not None else None


class UsageFinder:
    """The last `"usage"` key of a JSON body that passes by chunk by chunk, with what follows it (`SPAN` bytes:
    a usage object is small), wherever it is: vLLM puts `prompt_logprobs` after `usage`, so it need not be near
    the end. `usage_object(finder.region)` reads it."""

    SPAN = 8192
    _KEY = b'"usage"'
    __slots__ = ("_carry", "_filling", "region")

    def __init__(self) -> None:
        self.region = b""
        self._carry = b""
        self._filling = False

    def add(self, data: bytes) -> None:
        buf = self._carry + data if self._carry else data
        at = buf.rfind(self._KEY)
        if at >= 0:
            self.region = buf[at : at + self.SPAN]
            self._filling = len(self.region) < self.SPAN
        elif self._filling:
            self.region += data[: self.SPAN - len(self.region)]
            self._filling = len(self.region) < self.SPAN
        self._carry = buf[-(len(self._KEY) - 1) :]


def usage_object(body: bytes) -> Any:
    """The top-level `usage` object of a JSON response, found from the end without parsing the whole body.

    Embeddings answers are megabytes of floats with `usage` near the end. A key `"usage"` followed by `:` and
    `{` cannot come from inside a JSON string (quotes there are escaped), so the last such match is the key.
    """
    at = len(body)
    while True:
        at = body.rfind(b'"usage"', 0, at)
        if at < 0:
            return None
        i = at + 7
        while i < len(body) and body[i] in b" \t\r\n":
            i += 1
        if i < len(body) and body[i] == 0x3A:  # ':'
            i += 1
            while i < len(body) and body[i] in b" \t\r\n":
                i += 1
            if i < len(body) and body[i] == 0x7B:  # '{'
                return _object_at(body, i)


def _object_at(body: bytes, start: int) -> Any:
    # A usage object is small and nests at most one level (`prompt_tokens_details`): try each closing brace.
    end = start
    for _ in range(8):
        end = body.find(b"}", end + 1)
        if end < 0:
            return None
        try:
            return orjson.loads(body[start : end + 1])
        except orjson.JSONDecodeError:
            continue
    return None
