"""Responses-API stream folding for audit: a stream's events folded into the `response` object the client got.

A stream that reached its final event (`response.completed`, `.incomplete` or `.failed`) is that event's own
`response` object, as the upstream made it. One that ended before (the client left, the upstream broke) is
built from what was seen: the head of `response.created`/`.in_progress` (id, model, settings), each output item
as `response.output_item.added` started it, with its text, refusal, reasoning, summary and tool-call input
appended from their deltas, or whole once `response.output_item.done` gave it. Such a response says
`status: "incomplete"` and `incomplete_details.reason: "stream_ended"` (the sidecar's word, not one OpenAI sends;
beside `truncated: true` it means folding stopped at the audit's cap) and `usage: null`: the record's own usage
says what was charged. Items are found by `item_id` (llama-server names nothing else), else by `output_index`.
Events are folded as they come (`StreamCapture.FOLD_BYTES` at a time); text is kept as pieces, joined once.
"""

from __future__ import annotations

from typing import Any

from sidecar.wire.sse import parse_events

FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Delta event -> (the item's field it extends, the part type it creates, the part's text key); a part field
# (`content`, `summary`) is a list of parts at the event's `content_index`/`summary_index`.
DELTAS: dict[str, tuple[str, str, str]] = {
    "response.output_text.delta": ("content", "output_text", "text"),
    "response.refusal.delta": ("content", "refusal", "refusal"),
    "response.reasoning_text.delta": ("content", "reasoning_text", "text"),
    "response.reasoning_summary_text.delta": ("summary", "summary_text", "text"),
    "response.function_call_arguments.delta": ("arguments", "", ""),
    "response.mcp_call_arguments.delta": ("arguments", "", ""),
    "response.custom_tool_call_input.delta": ("input", "", ""),
    "response.code_interpreter_call_code.delta": ("code", "", ""),
}
# The item a delta implies when no `output_item.added` came before it.
_ITEM_TYPES = {
    "output_text": "message",
    "refusal": "message",
    "reasoning_text": "reasoning",
    "summary_text": "reasoning",
}
_HEAD_EVENTS = frozenset({"response.created", "response.in_progress", "response.queued"})


class _Item:
    """One output item: as last given whole, plus the pieces its deltas added since."""

    __slots__ = ("item", "pieces")

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item
        self.pieces: dict[tuple[str, int, str, str], list[str]] = {}

    def result(self) -> dict[str, Any]:
        out = dict(self.item)
        for (field, index, part_type, key), pieces in self.pieces.items():
            text = "".join(pieces)
            if not key:  # a string field of the item itself (a call's arguments)
                value = out.get(field)
                out[field] = (value if isinstance(value, str) else "") + text
                continue
            parts = out.get(field)
            parts = list(parts) if isinstance(parts, list) else []
            while len(parts) <= index:
                parts.append({"type": part_type})
            part = dict(parts[index]) if isinstance(parts[index], dict) else {"type": part_type}
            before = part.get(key)
            part[key] = (before if isinstance(before, str) else "") + text
            parts[index] = part
            out[field] = parts
        return out


class ResponsesFold:
    """A Responses stream's events folded into one `response` object (see the module's docstring)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.items: dict[Any, _Item] = {}  # by item id (or output index), in the order they started
        self.indexes: dict[Any, Any] = {}  # output_index -> the key in `items`
        self.final: dict[str, Any] | None = None
        self.chars = 0

    def fold(self, regions: list[bytes], sep: bytes) -> None:
        for event in parse_events(regions, sep):
            self.add(event)

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in DELTAS:
            self._delta(event, DELTAS[kind])
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self._item(event)
        elif kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            self._part(event, "content" if kind == "response.content_part.added" else "summary")
        elif kind in _HEAD_EVENTS or kind in FINAL:
            response = event.get("response")
            if isinstance(response, dict):
                if kind in FINAL:
                    self.final = response
                else:
                    self.head = response

    def _key(self, event: dict[str, Any]) -> Any:
        item_id, index = event.get("item_id"), event.get("output_index")
        if isinstance(item_id, str) and item_id:
            if index is not None and index not in self.indexes:
                self.indexes[index] = item_id
            return item_id
        return self.indexes.get(index, ("index", index))

    def _item(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            return
        item_id, index = item.get("id"), event.get("output_index")
        key = item_id if isinstance(item_id, str) and item_id else self.indexes.get(index, ("index", index))
        if index is not None:
            self.indexes.setdefault(index, key)
        self.items[key] = _Item(dict(item))  # an item given whole holds everything its deltas said

    def _part(self, event: dict[str, Any], field: str) -> None:
        part = event.get("part")
        entry = self.items.get(self._key(event))
        if entry is None or not isinstance(part, dict):
            return
        parts = entry.item.get(field)
        parts = list(parts) if isinstance(parts, list) else []
        index = event.get("content_index" if field == "content" else "summary_index")
        index = index if isinstance(index, int) and 0 <= index <= len(parts) else len(parts)
        parts[index : index + 1] = [dict(part)]
        entry.item[field] = parts

    def _delta(self, event: dict[str, Any], where: tuple[str, str, str]) -> None:
        delta = event.get("delta")
        if not isinstance(delta, str):
            return
        field, part_type, key = where
        item_key = self._key(event)
        entry = self.items.get(item_key)
        if entry is None:
            item = {"type": _ITEM_TYPES.get(part_type, "function_call")}
            if isinstance(event.get("item_id"), str):
                item["id"] = event["item_id"]
            entry = self.items[item_key] = _Item(item)
        index = event.get("content_index" if field == "content" else "summary_index")
        index = index if isinstance(index, int) and 0 <= index < 1024 else 0
        entry.pieces.setdefault((field, index if key else 0, part_type, key), []).append(delta)
        self.chars += len(delta)

    def size(self) -> int:
        """Characters of output (text, reasoning, tool input) folded so far."""
        return self.chars

    def result(self) -> dict[str, Any]:
        if self.final is not None:
            return self.final
        return {
            **self.head,
            "object": "response",
            "status": "incomplete",
            "incomplete_details": {"reason": "stream_ended"},
            "output": [entry.result() for entry in self.items.values()],
            "usage": None,
        }
