"""An Anthropic Messages stream folded into the `message` object the client would have got without streaming.

`message_start` gives the message's head (id, model, role) and the usage of the input; each
`content_block_start` opens a block (text, thinking, tool_use) at its index, its `content_block_delta`s add to
it (`text_delta`, `thinking_delta`, `signature_delta`, `input_json_delta`, whose `partial_json` pieces join into
the tool's input, parsed when the block is read out); `message_delta` gives the stop reason and the output count,
merged over `message_start`'s usage as the stream's own events are.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.wire.sse import parse_events

_HEAD = ("id", "type", "role", "model")
# A delta's text field, by its type: where its piece of the block goes.
_PIECES = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}


class MessageAggregate:
    """Messages stream events folded into one `message`, block by block; pieces are kept as lists and joined
    once, at the end."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.blocks: dict[Any, dict[str, Any]] = {}
        self.stop: dict[str, Any] = {"stop_reason": None, "stop_sequence": None}
        self.usage: dict[str, Any] | None = None
        self._size = 0

    def fold(self, regions: list[bytes], sep: bytes) -> None:
        """A fold's worth of complete events (`StreamCapture.fold`)."""
        for event in parse_events(regions, sep):
            self.add(event)

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta":
            self._delta(event.get("index"), event.get("delta"))
        elif kind == "content_block_start":
            self._start(event.get("index"), event.get("content_block"))
        elif kind == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            self.head = {k: message[k] for k in _HEAD if k in message}
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                self.stop.update({k: delta[k] for k in self.stop if k in delta})
            self._usage(event.get("usage"))

    def _start(self, index: Any, block: Any) -> None:
        if not isinstance(block, dict):
            return
        slot = {k: v for k, v in block.items() if k not in ("text", "thinking", "input")}
        slot["pieces"] = {"text": [block["text"]] if isinstance(block.get("text"), str) else []}
        if block.get("type") == "thinking":
            slot["pieces"] = {"thinking": [block.get("thinking") or ""], "signature": []}
        elif block.get("type") == "tool_use":
            slot["pieces"] = {"partial_json": []}
            slot["input"] = block.get("input")
        self.blocks[index] = slot

    def _delta(self, index: Any, delta: Any) -> None:
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        field = "partial_json" if kind == "input_json_delta" else _PIECES.get(kind) if isinstance(kind, str) else None
        piece = delta.get(field) if field is not None else None
        if not isinstance(piece, str):
            return
        slot = self.blocks.get(index)
        if slot is None:  # a delta without its start: a text block, as the delta's kind says
            slot = self.blocks[index] = {"type": "text", "pieces": {}}
        slot["pieces"].setdefault(field, []).append(piece)
        self._size += len(piece)

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # a later figure replaces an earlier one; what it leaves unsaid stays
            self.usage = {**(self.usage or {}), **usage}

    def size(self) -> int:
        """Characters of content (text, thinking, tool input) aggregated so far."""
        return self._size

    def result(self) -> dict[str, Any]:
        content = [_block(self.blocks[i]) for i in sorted(self.blocks, key=_order)]
        return {**self.head, "content": content, **self.stop, "usage": self.usage}


def _block(slot: dict[str, Any]) -> dict[str, Any]:
    block = {k: v for k, v in slot.items() if k not in ("pieces", "input")}
    pieces: dict[str, list[str]] = slot["pieces"]
    if slot.get("type") == "tool_use":
        text = "".join(pieces.get("partial_json", ()))
        block["input"] = _json(text) if text else slot.get("input", {})
        return block
    for field, parts in pieces.items():
        block[field] = "".join(parts)
    return block


def _json(text: str) -> Any:
    """A tool's input, as the pieces joined: its JSON when they make one (a cut stream's do not: kept as text)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _order(index: Any) -> tuple[int, str]:
    return (index, "") if isinstance(index, int) else (1 << 62, str(index))
