"""Prompt-token estimate for reservations: cheap, pure, biased high on ordinary text, and never steerable down.

Estimate = ceil(length of text / 3) + token ids + media items x `limits.media_tokens` + 4 per chat message + 8.

What counts is everything in the body that can reach the prompt, wherever the request puts it: every string at
any depth (`messages`, `prompt`, `input`, `instructions`, `system`, `documents`, `query`, infill's
`input_prefix`/`input_suffix`/`input_extra`, fields no preset knows yet, ...), object keys inside tool and
function definitions, and every integer inside an array as one token id (`[1, 2, 3]`, a batch of such arrays).
Only the settings named in `SETTINGS` (the model's name, stop strings, sampling and output-format options,
identifiers) are left out: they never become prompt text. A field added as a decoy (`"messages": []` on a
completion, `"input": 0` on a rerank) can only add to the estimate, never switch it away from the text.

Media (an image, audio or video: a data URL, a link, or base64 under `image_url`, `input_audio.data`,
`multimodal_data` and the like) counts `limits.media_tokens` per item, not its encoded length: what an image
costs depends on the model's processor, not on its PNG's size.

Text length is counted in characters when it is ASCII and in UTF-8 bytes otherwise. What this promises,
proven against a real 65,000-token byte-level BPE (tests/test_tokens.py):
- For any text a tokenizer does not rewrite (equal to its NFKC form), the estimate is at least a third of the
  true count: a byte-level BPE never makes more tokens than UTF-8 bytes. It gets near that floor only on
  text of about one token per byte (emoji, rare symbols, base64: measured 0.44-0.6x). Characters that NFKC
  expands (ligatures such as U+FDFA, 3 bytes, 15 tokens) are the one exception.
- On English prose and Python code, in passages of 1,000 characters or more, it lies between 0.85x and 3x
  the true count; as a whole, 1.44x on Python's own documentation, 1.50x on its source, 1.21x on this
  project's README: higher where whitespace runs are long, below 1x only around digit runs or rare punctuation.
It sizes the reservation (reconciled to the upstream's real usage when the request ends) and is what a
request is charged when its client leaves before any usage is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 3
PER_MESSAGE = 4
BASE = 8
MEDIA_TOKENS = 1024  # limits.media_tokens' default: an image of a typical vision model (LLaVA 576, Pixtral ~1k)

MAX_DEPTH = 64  # server.max_json_depth's default: deeper bodies are refused before this runs

# Top-level settings that never become prompt text: leaving them out keeps the estimate of a plain chat honest.
# Anything not named here counts, so a field the sidecar does not know can only raise the estimate.
SETTINGS = frozenset(
    {
        "model", "user", "stop", "stop_token_ids", "allowed_token_ids", "bad_words", "logit_bias",
        "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
        "guided_decoding_backend", "stream_options", "metadata", "cache_salt", "request_id", "prompt_cache_key",
        "safety_identifier", "service_tier", "reasoning_effort", "tool_choice", "sampling_params", "lora_request",
    }
)  # fmt: skip
SCHEMAS = frozenset({"tools", "functions"})  # their keys are prompt text too (a tool's schema is rendered into it)
# Keys whose value is media: a string there that looks like media (a URL or base64) is one item.
MEDIA_KEYS = frozenset(
    {
        "image_url", "video_url", "audio_url", "input_audio", "url", "data", "file_data", "file_url",
        "multimodal_data", "image_data", "images", "image",
    }
)  # fmt: skip
_LINK = ("data:", "http://", "https://", "file:", "s3://", "gs://")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=_-]{64,}")


@dataclass(slots=True)
class Measure:
    """What a JSON value holds for the estimate: characters of text, token ids, media items."""

    chars: int = 0
    ids: int = 0
    media: int = 0

    def tokens(self, media_tokens: int = MEDIA_TOKENS) -> int:
        return -(-self.chars // CHARS_PER_TOKEN) + self.ids + self.media * media_tokens


def _length(text: str) -> int:
    """Characters of ASCII text, UTF-8 bytes of any other: scripts beyond ASCII take 1-3 bytes a token, so
    characters alone would undercount them up to sevenfold. Lone surrogates (legal in JSON) count 3 bytes."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _is_media(text: str) -> bool:
    """A link or a run of base64 (the first 4 KiB checked): prose, which has spaces, is never taken for one."""
    if text.startswith(_LINK):
        return True
    head = text[:4096]
    return head.isascii() and _BASE64.fullmatch(head.encode()) is not None


def _measure(value: Any, keys: bool, depth: int = 0, into: Measure | None = None, media: bool = False) -> Measure:
    """Add what `value` holds to `into`. Integers inside arrays are token ids; `keys` also counts object keys
    (tool schemas); `media`: the value sits under a media key, so a string there that looks like media is one
    item (any other string there is text, as everywhere)."""
    into = Measure() if into is None else into
    if isinstance(value, str):
        if media and _is_media(value):
            into.media += 1
        else:
            into.chars += _length(value)
        return into
    if depth > MAX_DEPTH:
        return into
    if isinstance(value, list):
        for item in value:
            if isinstance(item, int) and not isinstance(item, bool):
                into.ids += 1
            else:
                _measure(item, keys, depth + 1, into, media)
    elif isinstance(value, dict):
        # content parts ({"type": "text", "text": ...}), tool definitions and the like: count their strings
        for key, item in value.items():
            if keys:
                into.chars += _length(key)
            _measure(item, keys, depth + 1, into, media or key in MEDIA_KEYS)
    return into


def estimate_prompt(doc: dict[str, Any] | None, media_tokens: int = MEDIA_TOKENS) -> int:
    """Estimated prompt tokens of a request body (its parsed JSON object; None: a body not read, 0).

    Never below what the body proves: every token id counts one, every string that can reach the prompt
    counts, and a field added as a decoy can only raise it."""
    if doc is None:
        return 0
    measure = Measure()
    for key, value in doc.items():
        if key not in SETTINGS:
            _measure(value, key in SCHEMAS, 0, measure, key in MEDIA_KEYS)
    messages = doc.get("messages")
    overhead = PER_MESSAGE * len(messages) if isinstance(messages, list) else 0
    return measure.tokens(media_tokens) + overhead + BASE
