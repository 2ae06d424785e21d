"""Prompt-token estimate for reservations: cheap, pure, and biased high.

Estimate = ceil(characters of text / 3) + 4 per message + 8. Real BPE tokenizers (Llama 3, Qwen 2, GPT-4's
cl100k) average about 4 characters per token on English text and 2.5-3.5 on code, other scripts and JSON, so
for typical text the estimate is 0-40 % above the true count; it can fall below it only for text of about
one token per 1-2 characters (e.g. CJK, long digit runs), where it may be up to ~60 % low. It only sizes the
reservation: the lease is reconciled to the upstream's real usage when the request ends.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 3
PER_MESSAGE = 4
BASE = 8


def _text_chars(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 0
    if isinstance(value, list):
        return sum(_text_chars(v, depth + 1) for v in value)
    if isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), tool definitions and the like: count their strings
        return sum(_text_chars(v, depth + 1) for v in value.values())
    return 0


def estimate_prompt(doc: dict[str, Any] | None, body_len: int = 0) -> int:
    """Estimated prompt tokens of a request body (a generation request's parsed JSON)."""
    if doc is None:
        return 0
    messages = doc.get("messages")
    if isinstance(messages, list):
        chars = _text_chars(messages) + _text_chars(doc.get("tools"))
        return -(-chars // CHARS_PER_TOKEN) + PER_MESSAGE * len(messages) + BASE
    for name in ("prompt", "input"):
        if name in doc:
            return -(-_text_chars(doc[name]) // CHARS_PER_TOKEN) + BASE
    return -(-body_len // (CHARS_PER_TOKEN * 2))
