"""Pure server-sent-events scanning for OpenAI-style streams (no aiohttp.web, no I/O).

`StreamScanner.feed(chunk)` looks at a copy of each upstream chunk as it passes: it splits complete events,
notes the first event that carries generated output (TTFT), counts output deltas (one per token on vLLM,
llama-server and SGLang), and reads the usage event. It returns the bytes to send on: the chunk itself,
untouched, unless `strip_usage` is set, in which case complete events are passed on except the one usage
event the client did not ask for (a partial trailing event is held until its terminator arrives; SSE clients
dispatch only complete events, so holding it costs the client nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usage_from(obj: Any) -> Usage | None:
    """Usage from a chat/completions/embeddings `usage` object or a Responses-API one; None when absent."""
    if not isinstance(obj, dict):
        return None
    prompt = _int_or_none(obj.get("prompt_tokens", obj.get("input_tokens")))
    completion = _int_or_none(obj.get("completion_tokens", obj.get("output_tokens")))
    details = obj.get("prompt_tokens_details") or obj.get("input_tokens_details")
    cached = _int_or_none(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt is None and completion is None:
        return None
    if completion is None and "total_tokens" in obj and prompt is not None:
        total = _int_or_none(obj.get("total_tokens"))
        completion = total - prompt if total is not None and total >= prompt else None
    return Usage(prompt, completion, cached)


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` field of one event (without its terminator), or None when it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


def count_output(obj: dict[str, Any]) -> int:
    """How many output deltas (≈ tokens) one parsed stream event carries, over all choices."""
    kind = obj.get("type")
    if isinstance(kind, str):  # Responses API: one delta event per token of text, reasoning or arguments
        return 1 if kind.endswith(".delta") else 0
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return 0
    n = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            if (
                delta.get("content")
                or delta.get("reasoning_content")
                or delta.get("reasoning")
                or delta.get("tool_calls")
            ):
                n += 1
        elif choice.get("text"):
            n += 1
    return n


class StreamScanner:
    __slots__ = ("strip_usage", "events", "deltas", "usage", "done", "first_output", "_tail", "_sep", "_parsed")

    def __init__(self, strip_usage: bool = False, keep_events: bool = False) -> None:
        self.strip_usage = strip_usage
        self.events = 0
        self.deltas = 0
        self.usage: Usage | None = None
        self.done = False
        self.first_output = False
        self._tail = b""
        self._sep = b""
        self._parsed: list[dict[str, Any]] | None = [] if keep_events else None

    @property
    def parsed(self) -> list[dict[str, Any]]:
        """The parsed JSON events seen so far (only kept when asked for, e.g. for audit aggregation)."""
        return self._parsed if self._parsed is not None else []

    def feed(self, chunk: bytes) -> bytes:
        """Scan one upstream chunk; return the bytes to pass on to the client."""
        buf = self._tail + chunk if self._tail else chunk
        if not self._sep:  # the first line ending tells the stream's separator (\n\n or \r\n\r\n)
            nl = buf.find(b"\n")
            if nl < 0:
                self._tail = buf
                return b"" if self.strip_usage else chunk
            self._sep = b"\r\n\r\n" if nl > 0 and buf[nl - 1] == 0x0D else b"\n\n"
        parts = buf.split(self._sep)
        self._tail = parts.pop()
        if not self.strip_usage:
            for part in parts:
                self._scan(part)
            return chunk
        out = []
        for part in parts:
            if not self._scan(part):
                out.append(part)
                out.append(self._sep)
        return b"".join(out)

    def flush(self) -> bytes:
        """At the end of the upstream body: scan and return an unterminated trailing event, if any."""
        tail, self._tail = self._tail, b""
        if not tail:
            return b""
        hidden = self._scan(tail)
        return b"" if not self.strip_usage or hidden else tail

    def _scan(self, event: bytes) -> bool:
        """Account for one complete event; True when it is the usage-only event to hide."""
        if self._sep == b"\r\n\r\n":
            event = event.replace(b"\r\n", b"\n")
        data = event_data(event)
        if data is None:
            return False
        self.events += 1
        if data == DONE:
            self.done = True
            return False
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        if self._parsed is not None:
            self._parsed.append(obj)
        n = count_output(obj)
        if n:
            self.deltas += n
            self.first_output = True
        return self._take_usage(obj)

    def _take_usage(self, obj: dict[str, Any]) -> bool:
        raw = obj.get("usage")
        if raw is None and obj.get("type") == "response.completed":
            response = obj.get("response")
            raw = response.get("usage") if isinstance(response, dict) else None
        usage = usage_from(raw)
        if usage is None:
            return False
        self.usage = usage
        # Only the usage-only chunk (no choices) is hidden; continuous usage stats on content chunks stay.
        return self.strip_usage and obj.get("choices") == []
