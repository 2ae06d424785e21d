"""What many tests send: the smallest chat request, its streaming form, and one POST that reads the whole answer."""

from __future__ import annotations

from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM: dict[str, Any] = {**CHAT, "stream": True}
CHAT_PATH = "/v1/chat/completions"


async def post(url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    """POST `body` (JSON, or bytes as they are) to `url`: (status, headers, whole body)."""
    sent = {"json": body} if isinstance(body, dict) else {"data": body}
    async with aiohttp.ClientSession() as s, s.post(url, headers=headers or {}, **sent) as r:
        answer: CIMultiDictProxy[str] = r.headers.copy()
        return r.status, answer, await r.read()
