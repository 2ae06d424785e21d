"""RequestRecord: the one terminal record of a request, and the Outcome it ended with.

A leaf module. Every request that reaches the proxy handler gets exactly one record: it is started when the
request arrives, finished once in the handler's `finally`, and handed to the writer and the request log line.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, fields
from typing import Any, Literal


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    CLIENT_DISCONNECTED = "client_disconnected"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    STORE_UNAVAILABLE = "store_unavailable"
    SHUTDOWN = "shutdown"


UsageSource = Literal["upstream", "counted", "reserved", "none"]  # answer, deltas, reservation, unknown


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the response was sent"


def new_request_id() -> str:
    """`req_` + microseconds since the epoch (13 hex digits) + 64 random bits: unique, and in time order, so the
    store's primary-key index grows at its end instead of taking inserts at random pages."""
    return f"req_{time.time_ns() // 1000:013x}{os.urandom(8).hex()}"


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    path: str
    started_at: float
    t0: float
    client_request_id: str | None = None
    key_id: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 0
    outcome: Outcome = Outcome.COMPLETED
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the upstream's cache
    cache_write_tokens: int | None = None  # prompt tokens written to its cache (Anthropic's cache creation)
    reasoning_tokens: int | None = None  # output tokens spent on reasoning
    usage_source: UsageSource = "none"
    upstream_status: int | None = None
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    chunks: int = 0
    finished_at: float = 0.0
    # For the access log line only (not stored): who asked, and with what.
    client_addr: str | None = None
    user_agent: str | None = None
    # Not stored either: for the trace span and the histograms of the sidecar's own time.
    span: Any = None  # the request's server span, when tracing is on
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    output: Any = None  # the answer's choices, only when tracing captures content
    queued_ms: float = 0.0  # waited for a lease (the key's concurrency or the global cap)
    upload_ms: float = 0.0  # the client's body arriving: the client's time, not the sidecar's
    sent_at: float = 0.0  # monotonic: the upstream request went out
    upstream_done: float = 0.0  # monotonic: the upstream's answer was read to its end

    @classmethod
    def start(cls, method: str, path: str, client_request_id: str | None = None) -> RequestRecord:
        return cls(new_request_id(), method, path, time.time(), time.monotonic(), client_request_id)

    def queued(self, ms: float) -> None:
        """The request waited `ms` for a global upstream slot (the queue's time, not the sidecar's own)."""
        self.queued_ms = ms

    def fail(self, status: int, outcome: Outcome, code: str | None) -> None:
        self.status = status
        self.outcome = outcome
        self.error_code = code

    def mark_first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = round((time.monotonic() - self.t0) * 1000.0, 3)

    def set_usage(
        self,
        prompt: int | None,
        completion: int | None,
        cached: int | None,
        source: UsageSource,
        cache_write: int | None = None,
        reasoning: int | None = None,
    ) -> None:
        """The request's usage; the details (`cached`, `cache_write`, `reasoning`) only as the upstream said them."""
        self.prompt_tokens = prompt
        self.completion_tokens = completion
        self.total_tokens = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
        self.cached_tokens = cached
        self.cache_write_tokens = cache_write
        self.reasoning_tokens = reasoning
        self.usage_source = source

    def own_time(self) -> tuple[float, float] | None:
        """(before, after) in seconds: the sidecar's own time before the upstream request went out (less the
        lease wait and the client's upload) and after the upstream's answer was read; None when no request
        went out."""
        if not self.sent_at:
            return None
        before = self.sent_at - self.t0 - (self.queued_ms + self.upload_ms) / 1000.0
        after = self.t0 + self.latency_ms / 1000.0 - self.upstream_done if self.upstream_done else 0.0
        return max(0.0, before), max(0.0, after)

    def finish(self) -> RequestRecord:
        elapsed = time.monotonic() - self.t0
        self.latency_ms = round(elapsed * 1000.0, 3)
        self.finished_at = self.started_at + elapsed
        return self

    def as_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ROW_FIELDS}


_NOT_STORED = (
    "t0",
    "client_addr",
    "user_agent",
    "span",
    "response_model",
    "finish_reasons",
    "output",
    "queued_ms",
    "upload_ms",
    "sent_at",
    "upstream_done",
)
ROW_FIELDS = tuple(f.name for f in fields(RequestRecord) if f.name not in _NOT_STORED)
