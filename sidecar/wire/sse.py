"""Pure server-sent-events scanning for OpenAI-style streams (no aiohttp.web, no I/O).

`StreamScanner.feed(chunk)` looks at a copy of each upstream chunk as it passes: it splits complete events,
notes the first event that carries generated output (TTFT), counts output deltas (one per token on vLLM,
llama-server and SGLang), and reads the usage event. It returns the bytes to send on: the chunk itself,
untouched, unless `strip_usage` is set, in which case complete events are passed on except the one usage
event the client did not ask for (a partial trailing event is held until its terminator arrives; SSE clients
dispatch only complete events, so holding it costs the client nothing).
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.wire.routes import CHAT, COMPLETIONS, FAMILIES, GENERATE, MESSAGES, NATIVE, OTHER, RESPONSES
from sidecar.wire.usage import Usage, usage_of

DONE = b"[DONE]"


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` field of one event (without its terminator), or None when it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [line for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[6:] if line.startswith(b"data: ") else line[5:] for line in lines)


# What marks one output delta (≈ one token) in an event, per API, as (key, empty-value) byte patterns.
# `ntent":"` matches both `"content":"` and `"reasoning_content":"`. A key pattern can only match a real key:
# inside a JSON string every quote is escaped. Each pattern costs one C-speed pass over the new bytes, so the
# set is chosen per request (tool arguments only when the request declared tools).
_CHAT = ((b'ntent":"', b'ntent":""'), (b'"reasoning":"', b""))
_TOOLS = ((b'"arguments":"', b'"arguments":""'),)
_COMPLETIONS = ((b'"text":"', b'"text":""'),)
# The Responses API: one event per delta, named by its `type`; only the events that carry generated output count
# (text, refusal, reasoning and its summary; tool-call input when tools were declared), never a `.done` event
# that repeats them whole, nor an audio or annotation event. The whole `"type":"…"` pair is matched: its
# opening quote cannot be inside a string, so a delta whose text names an event is one delta.
_RESPONSES = tuple(
    (b'"type":"response.' + kind + b'.delta"', b"")
    for kind in (b"output_text", b"refusal", b"reasoning_text", b"reasoning_summary_text")
)
_RESPONSES_TOOLS = tuple(
    (b'"type":"response.' + kind + b'.delta"', b"")
    for kind in (
        b"function_call_arguments",
        b"custom_tool_call_input",
        b"mcp_call_arguments",
        b"code_interpreter_call_code",
    )
)
# The events that end a Responses stream (it has no `[DONE]`); each carries the response with its usage.
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Anthropic: one `content_block_delta` per token, told by its delta's type (a value, so no spaced form): text,
# thinking and a tool_use block's input. A thinking block's closing `signature_delta` carries no output.
_MESSAGES = ((b'"text_delta"', b""), (b'"thinking_delta"', b""), (b'"input_json_delta"', b""))


Patterns = tuple[tuple[bytes, bytes], ...]


def delta_patterns(family: str, tools: bool, spaced: bool = False) -> Patterns:
    """The delta patterns for a route family (`sidecar.wire.routes`; a path is looked up there)."""
    family = FAMILIES.get(family, OTHER) if family.startswith("/") else family
    patterns: Patterns
    if family == RESPONSES:
        patterns = _RESPONSES + _RESPONSES_TOOLS if tools else _RESPONSES
    elif family == MESSAGES:
        patterns = _MESSAGES
    elif family in (COMPLETIONS, GENERATE):
        patterns = _COMPLETIONS
    else:  # chat, and llama-server's native `content` deltas
        patterns = _CHAT + _TOOLS if tools else _CHAT
    if spaced:
        patterns = tuple((k.replace(b'":"', b'": "'), e.replace(b'":"', b'": "')) for k, e in patterns)
    return patterns


def count_deltas(region: bytes, patterns: Patterns, end: int | None = None) -> int:
    """Output deltas in complete events (`region`, or its first `end` bytes); one per choice per event, as vLLM,
    llama-server and SGLang stream."""
    n = 0
    for key, empty in patterns:
        hits = region.count(key, 0, end)
        if hits and empty:
            hits -= region.count(empty, 0, end)
        n += hits
    return n


class StreamScanner:
    __slots__ = (
        "_regions",
        "_family",
        "_usage_key",
        "_patterns",
        "_tools",
        "_sep",
        "_spaced",
        "_tail",
        "deltas",
        "done",
        "kept",
        "first_output",
        "strip_usage",
        "usage",
        "usage_partial",
    )

    def __init__(
        self,
        strip_usage: bool = False,
        keep_events: bool = False,
        family: str = CHAT,
        tools: bool = True,
    ) -> None:
        self.strip_usage = strip_usage
        self._family = FAMILIES.get(family, OTHER) if family.startswith("/") else family
        self._usage_key = _USAGE_KEYS.get(self._family, b'"usage"')
        self._tools = tools
        self._patterns = delta_patterns(self._family, tools)
        self.deltas = 0
        self.usage: Usage | None = None
        self.usage_partial = False  # the usage seen is a Messages stream's `message_start`: its input alone
        self.done = False
        self.first_output = False
        self._tail = b""
        self._sep = b""
        self._spaced = False
        self._regions: list[bytes] | None = [] if keep_events else None  # complete events, kept for audit
        self.kept = 0  # bytes in `_regions`

    @property
    def regions(self) -> list[bytes]:
        """The complete events seen so far, as they came (only when kept): join them with `sep`."""
        return self._regions if self._regions is not None else []

    def take_regions(self) -> list[bytes]:
        """The complete events kept so far (see `regions`), handed over: the scanner keeps none of them."""
        if self._regions is None:
            return []
        regions, self._regions, self.kept = self._regions, [], 0
        return regions

    @property
    def sep(self) -> bytes:
        return self._sep or b"\n\n"

    def feed(self, chunk: bytes) -> bytes:
        """Scan one upstream chunk; return the bytes to pass on to the client."""
        buf = self._tail + chunk if self._tail else chunk
        if not self._sep:  # the first line ending tells the stream's separator (\n\n or \r\n\r\n)
            nl = buf.find(b"\n")
            if nl < 0:
                self._tail = buf
                return b"" if self.strip_usage else chunk
            self._sep = b"\r\n\r\n" if nl > 0 and buf[nl - 1] == 0x0D else b"\n\n"
            if b'": "' in buf:
                self._patterns = delta_patterns(self._family, self._tools, spaced=True)
                self._spaced = True
        cut = buf.rfind(self._sep)
        if cut < 0:
            self._tail = buf
            return b"" if self.strip_usage else chunk
        end = cut + len(self._sep)
        self._tail = buf[end:]
        hidden = self._account(buf, cut)
        if not self.strip_usage:
            return chunk
        if hidden is None:
            return buf[:end]
        start, stop, replacement = hidden
        return buf[:start] + replacement + buf[stop:end]

    def flush(self) -> bytes:
        """At the end of the upstream body: scan and return an unterminated trailing event, if any."""
        tail, self._tail = self._tail, b""
        if not tail:
            return b""
        hidden = self._account(tail, len(tail))
        if not self.strip_usage:
            return b""
        if hidden is None:
            return tail
        start, stop, replacement = hidden  # the unterminated last event stays unterminated
        return tail[:start] + replacement[: -len(self.sep)] + tail[stop:]

    def _account(self, buf: bytes, cut: int) -> tuple[int, int, bytes] | None:
        """Account for complete events: `buf[:cut]`, without its final separator. It is read in place (bounded
        searches, no copy), so a chunk that passes through untouched costs no allocation here.

        Returns (start, stop, replacement) for the event that carries the usage we asked for: the slice to
        replace, separator included, and what goes there instead (nothing, or the event without `usage`,
        separator included); None when nothing changes.
        """
        sep = self._sep
        n = count_deltas(buf, self._patterns, cut)
        if n:
            self.deltas += n
            self.first_output = True
        if buf.endswith(b"data: [DONE]", 0, cut):  # nothing follows [DONE]: it ends the region it is in
            self.done = True
        if self._regions is not None:
            self._regions.append(buf[:cut])
            self.kept += cut
        if self._family == MESSAGES:
            self._messages_usage(buf[:cut])
            return None  # nothing is asked for on the client's behalf, so nothing is hidden
        at = buf.rfind(self._usage_key, 0, cut)
        if at < 0:
            return None
        start = buf.rfind(sep, 0, at)
        start = 0 if start < 0 else start + len(sep)
        stop = buf.find(sep, at, cut)
        stop = cut if stop < 0 else stop
        event = buf[start:stop]
        obj = _load_event(event)
        if obj is None:
            return None
        if self._family == RESPONSES and obj.get("type") in _RESPONSES_FINAL:
            self.done = True  # the stream's own end (a Responses stream has no `[DONE]`)
        usage = usage_of(obj)
        if usage is None:
            return None
        self.usage = usage.over(self.usage)
        # Only the usage chunk we asked for (no choices) changes; continuous usage stats on content chunks stay.
        if not self.strip_usage or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
            return None
        rest = {k: v for k, v in obj.items() if k != "usage"}
        if rest.keys() <= _ENVELOPE:
            return start, stop + len(sep), b""  # nothing but our usage: the event goes
        # Other fields too (llama-server's `timings`): the event stays, without the `usage` key we added.
        return start, stop + len(sep), _without_data(event, sep[: len(sep) // 2]) + b"data: " + orjson.dumps(rest) + sep

    def _messages_usage(self, region: bytes) -> None:
        """Every usage event of an Anthropic stream's region, in order: `message_start`'s (the input, exact, and
        an output of 0 or 1) and `message_delta`'s (the output; vLLM repeats the input). Both can come in one
        read (a short answer from llama-server, whose first token comes with `message_start`), so each counts."""
        sep = self._sep
        at = region.find(b'"usage"')
        while at >= 0:
            start = region.rfind(sep, 0, at)
            start = 0 if start < 0 else start + len(sep)
            stop = region.find(sep, at)
            stop = len(region) if stop < 0 else stop
            obj = _load_event(region[start:stop])
            usage = usage_of(obj) if obj is not None else None
            if obj is not None and usage is not None:
                self.usage = usage.over(self.usage)
                self.usage_partial = obj.get("type") == "message_start"
            at = region.find(b'"usage"', stop)
        if b'"message_stop"' in region:  # Anthropic's end of stream (it sends no [DONE])
            self.done = True


# What a usage-only chunk holds besides `usage` when nothing else is in it (hidden whole then).
_ENVELOPE = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier", "choices"})
# The key that marks the event holding a family's usage (OpenAI's `usage` unless the family says otherwise).
_USAGE_KEYS = {NATIVE: b'"tokens_predicted"', GENERATE: b'"meta_info"'}


def _without_data(event: bytes, eol: bytes) -> bytes:
    """An event's lines other than `data:` (its `event:`, `id:`, comments), each ending in `eol`."""
    lines = event.replace(b"\r\n", b"\n").split(b"\n")
    kept = [line for line in lines if line and not line.startswith(b"data:")]
    return b"".join(line + eol for line in kept)


def events_array(regions: list[bytes], sep: bytes) -> bytes | None:
    """The text of a JSON array of the stream's events, if the stream is nothing but `data: {...}` events.

    One C-speed replace instead of a split and a parse per event. A JSON text cannot hold a raw line break
    (strings escape it), so the separator only ever occurs between events; anything else in the stream
    (comments, `event:` lines, multi-line data) leaves text that is not JSON, which the caller's decode
    rejects, and the stream goes down the general path. None when it does not even start like one.
    """
    body = sep.join(regions)
    if not body.startswith(b"data: "):
        return None
    if body.endswith(b"data: [DONE]"):
        body = body[: -len(b"data: [DONE]")].rstrip(b"\r\n")
    return b"[" + body[6:].replace(sep + b"data: ", b",") + b"]"


def parse_events(regions: list[bytes], sep: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a stream's events, given its regions of complete events, one event at a time (the
    fast path for the usual stream, one decode of `events_array`, is the caller's: `chat.decode_chunks`)."""
    out = []
    for event in sep.join(regions).split(sep):
        obj = _load_event(event)
        if obj is not None:
            out.append(obj)
    return out


def _load_event(event: bytes) -> dict[str, Any] | None:
    data = event_data(event.replace(b"\r\n", b"\n") if b"\r" in event else event)
    if data is None or data == DONE:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
