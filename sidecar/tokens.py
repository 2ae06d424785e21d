"""Prompt-token estimate for reservations: cheap, pure, and biased high.

Estimate = ceil(characters of text / 3) + token ids + 4 per message + 8. Text is every string in the messages
(or `prompt` / `input`) plus tool and function definitions, keys included, at any depth; a prompt given as
token ids (`[1, 2, 3]`, or a batch of such arrays) counts exactly one token per id. Real BPE tokenizers
(Llama 3, Qwen 2, GPT-4's cl100k) average about 4 characters per token on English text and 2.5-3.5 on code,
other scripts and JSON, so for typical text the estimate is 0-40 % above the true count; it can fall below it
only for text of about one token per 1-2 characters (e.g. CJK, long digit runs), where it may be up to ~60 %
low. It sizes the reservation (reconciled to the upstream's real usage when the request ends) and is what a
request is charged when its client leaves before any usage is known.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 3
PER_MESSAGE = 4
BASE = 8


MAX_DEPTH = 64  # server.max_json_depth's default: deeper bodies are refused before this runs


def _measure(value: Any, keys: bool, depth: int = 0) -> tuple[int, int]:
    """(characters of text, token ids) in a JSON value. Integers inside arrays are token ids (a prompt given
    as `[1, 2, 3]` or `[[1, 2], [3]]`), one token each; `keys` also counts object keys (tool schemas)."""
    if isinstance(value, str):
        return len(value), 0
    if depth > MAX_DEPTH:
        return 0, 0
    chars = ids = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                ids += 1
            else:
                c, n = _measure(item, keys, depth + 1)
                chars += c
                ids += n
    elif isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), tool definitions and the like: count their strings
        for key, item in value.items():
            c, n = _measure(item, keys, depth + 1)
            chars += c + (len(key) if keys else 0)
            ids += n
    return chars, ids


def _tokens(chars: int, ids: int) -> int:
    return -(-chars // CHARS_PER_TOKEN) + ids


def estimate_prompt(doc: dict[str, Any] | None, body_len: int = 0) -> int:
    """Estimated prompt tokens of a request body (a generation request's parsed JSON).

    Never below what the body proves: token ids are counted one each, whatever else is estimated.
    """
    if doc is None:
        return 0
    messages = doc.get("messages")
    if isinstance(messages, list):
        tools = _measure([doc.get("tools"), doc.get("functions")], keys=True)
        text = _measure(messages, keys=False)
        return _tokens(text[0] + tools[0], text[1] + tools[1]) + PER_MESSAGE * len(messages) + BASE
    for name in ("prompt", "input"):
        if name in doc:
            return _tokens(*_measure(doc[name], keys=False)) + BASE
    return -(-body_len // (CHARS_PER_TOKEN * 2))
