"""Request bodies many tests send: the smallest chat request, its streaming form, and the `max_tokens` values
the sidecar must read as the upstream does (`MAX_TOKENS`)."""

from __future__ import annotations

from typing import Any

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM: dict[str, Any] = {**CHAT, "stream": True}
CHAT_PATH = "/v1/chat/completions"


# The output budget: which values reach the upstream, which the sidecar refuses, and why (see README).
MAX_TOKENS = [
    # raw value      reaches upstream  reservation (None: no cap named, see `Limits.reserve`)  why
    (b"-1", True, None),  # llama-server: no limit. Not ours to judge: reserved as a request with no cap
    (b"0", True, 0),  # no output asked for: none reserved (vLLM refuses it; llama-server generates nothing)
    (b"1", True, 1),
    (b"2147483648", True, 10_000_000),  # a positive integer: reserved, capped at the ceiling (and the bucket)
    (b"1.5", True, None),  # a number that is not a positive integer: passed on, default reserved
    (b"300.0", True, 300),  # a float that is an integer: what the upstream's validation reads it as
    (b"null", True, None),  # absent
    (b"1e400", False, None),  # not JSON a parser can represent (infinity): 400 invalid_json
    (b'"3"', False, None),  # a string: no budget the sidecar can reason about: 400
    (b"true", False, None),  # a boolean: likewise
]
