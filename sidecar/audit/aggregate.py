"""Stream aggregation for audit: a stream's events folded into one `chat.completion`-shaped object (a Responses
stream into its `response` object: `sidecar.audit.responses`; an Anthropic Messages stream into its `message`:
`sidecar.audit.messages`).

A chat or completions stream folds into its `chat.completion` object (`sidecar.audit.chat`, imported with its
msgspec only when such a stream is audited). `StreamCapture` folds an audited stream as it goes, so it never
holds more than a fold's worth of raw events.
"""

from __future__ import annotations

from typing import Any, Protocol

from sidecar.audit.messages import MessageAggregate
from sidecar.audit.responses import ResponsesFold
from sidecar.wire.routes import CHAT, MESSAGES, RESPONSES


class Folding(Protocol):
    """What folds one API's stream events into the answer its client would have got."""

    def fold(self, regions: list[bytes], sep: bytes) -> None: ...
    def size(self) -> int: ...
    def result(self) -> dict[str, Any]: ...


_FOLDS: dict[str, type[Folding]] = {RESPONSES: ResponsesFold, MESSAGES: MessageAggregate}


def _fold(family: str) -> Folding:
    fold = _FOLDS.get(family)
    if fold is not None:
        return fold()
    # Here, not at the top: msgspec stays out of a worker that audits no stream (the default).
    from sidecar.audit.chat import Aggregate

    return Aggregate()


class StreamCapture:
    """An audited stream's events, folded into one aggregate every `FOLD_BYTES` of raw events, so it holds at
    most that much raw SSE plus the aggregated content; past the payload cap of content, folding stops and the
    response says `truncated`."""

    FOLD_BYTES = 256 * 1024

    def __init__(self, cap: int, family: str = CHAT) -> None:
        self.cap = cap
        self.family = family  # which API's events these are (`sidecar.wire.routes`): what they fold into
        self.aggregate: Folding = _fold(family)
        self.truncated = False

    def fold(self, regions: list[bytes], sep: bytes) -> None:
        if self.truncated or not regions:
            return
        self.aggregate.fold(regions, sep)
        if self.aggregate.size() > self.cap:
            self.truncated = True

    def result(self) -> dict[str, Any]:
        out = self.aggregate.result()
        if self.truncated:
            out["truncated"] = True
        return out
