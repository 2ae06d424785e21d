"""The upstream's model list (`GET /v1/models`): the names it serves and, where it says (vLLM's
`max_model_len`, on the `vllm` and `sglang` presets), each model's context length, which bounds what a request
with no output cap can make it generate.

Asked for in the background when the upstream is opened, then again once the list is a minute old and someone
needs it; never on a request's path, except the few that arrive while the first ask is still out (they wait for
it, within the upstream's health timeout). A failed ask leaves what was known (until then: nothing, and the
callers fall back to their defaults) and is tried again after `RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from sidecar.upstream.response import UpstreamFailure

EVERY = 60.0  # seconds a list is fresh
RETRY = 5.0  # seconds after a failed ask (a model server still loading its weights) before the next
MAX_MODELS = 256  # bounded whatever the upstream lists

LISTS_LENGTHS = frozenset({"vllm", "sglang"})  # presets whose model list gives `max_model_len`
Get = Callable[[str, int], Awaitable[tuple[int, str, bytes]]]  # (target, byte limit) -> (status, type, body)


class ModelList:
    def __init__(self, get: Get, target: str, lengths: bool = False) -> None:
        self._get = get
        self.lengths = lengths  # the upstream's list gives context lengths (`LISTS_LENGTHS`): ask for them
        self._target = target
        self.names: frozenset[str] | None = None  # None: never listed
        self.contexts: dict[str, int] = {}
        self._asked = -EVERY
        self._asking: asyncio.Task[None] | None = None

    @property
    def listed(self) -> bool:
        return self.names is not None

    def start(self) -> None:
        """The first ask, in the background (`Upstream.open`), when the list gives context lengths."""
        if self.lengths:
            self._start()

    async def context(self, model: str | None) -> int | None:
        """The context length of `model` (the longest listed, when it names none or one not listed: an alias
        the upstream may resolve), or None when the upstream does not say. While the first ask is out, a
        caller waits for it; later ones use what is known and refresh it in the background when it is old."""
        if not self.lengths:
            return None
        if self._asking is not None and not self._asking.done() and not self.listed:
            await asyncio.shield(self._asking)
        elif time.monotonic() - self._asked >= EVERY:
            self._start()
        known = self.contexts.get(model) if model is not None else None
        return known if known is not None else max(self.contexts.values(), default=None)

    async def refresh(self) -> None:
        """Ask the upstream (callers arriving meanwhile wait for the same answer)."""
        await asyncio.shield(self._start())

    def _start(self) -> asyncio.Task[None]:
        if self._asking is None or self._asking.done():
            self._asking = asyncio.get_running_loop().create_task(self._ask())
        return self._asking

    async def _ask(self) -> None:
        self._asked = time.monotonic()
        try:
            status, _, body = await self._get(self._target, 1 << 20)
            data = orjson.loads(body).get("data") if status == 200 else None
        except (TimeoutError, UpstreamFailure, orjson.JSONDecodeError, AttributeError):
            self._asked -= EVERY - RETRY  # asked again soon; until then what was known stays
            return
        if isinstance(data, list):
            entries = [m for m in data if isinstance(m, dict) and _name(m)][:MAX_MODELS]
            self.names = frozenset(_name(m) for m in entries)
            self.contexts = {_name(m): n for m in entries if (n := _length(m)) is not None}

    async def close(self) -> None:
        if self._asking is not None and not self._asking.done():
            self._asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._asking


def _name(model: dict[str, Any]) -> str:
    name = model.get("id")
    return name[:200] if isinstance(name, str) else ""


def _length(model: dict[str, Any]) -> int | None:
    value = model.get("max_model_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
