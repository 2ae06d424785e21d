"""Errors a client can see, each rendered in OpenAI's shape `{"error": {message, type, param, code}}`.

    SidecarError(status, type, code)          base: carries the HTTP status, extra headers and the outcome
     ├── BadRequest              400  invalid_request_error   outcome bad_request (and its kinds below)
     │    ├── PayloadTooLarge    413
     │    ├── RequestTimeout     408
     │    ├── NotFound           404
     │    ├── MethodNotAllowed   405  (with `Allow`)
     │    └── UnsupportedMediaType 415
     ├── Unauthorized            401  invalid_request_error   outcome unauthorized
     │    └── Forbidden          403  permission_error        outcome unauthorized
     ├── RateLimited             429  requests | tokens       outcome rate_limited
     │    └── Overloaded         503  server_overloaded       outcome rate_limited
     ├── UpstreamError           502  upstream_error          outcome upstream_error
     ├── UpstreamTimeout         504  upstream_timeout        outcome upstream_timeout
     ├── StoreUnavailable        503  server_error            outcome store_unavailable (keys cannot be looked up)
     ├── ReportTooSlow           503  server_error            (a usage report past store.report_timeout)
     └── ShuttingDown            503  server_shutting_down    outcome shutdown

`anthropic_body` renders the same errors in Anthropic's shape, for the clients of its Messages API.

At the end, `failure`: the one table from a transport or store failure (`sidecar.upstream.response`,
`sidecar.upstream.deadline`, `sidecar.store.base`) to the error the client sees and the reason
`sidecar_upstream_errors_total` counts it under, as httpx's `_exceptions.py` maps its transport's.

A leaf module (it imports only leaves: `records` for the `Outcome` an error ends a request with, and the
failures it maps): it builds plain bytes and a header dict; the web layer wraps them in a response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

from sidecar.records.record import Outcome
from sidecar.store.base import ReportTimeout, StoreError
from sidecar.upstream.deadline import DeadlineExpired
from sidecar.upstream.response import ConnectFailed, PoolExhausted, UpstreamBroke, UpstreamFailure

UpstreamErrorReason = Literal[
    "connect", "timeout_first_byte", "timeout_idle", "timeout_total", "status_5xx", "dropped", "protocol"
]
UPSTREAM_ERROR_REASONS: tuple[UpstreamErrorReason, ...] = get_args(UpstreamErrorReason)


class SidecarError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    outcome: Outcome = Outcome.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})
        if code is not None:
            self.code = code
        if type_ is not None:
            self.type = type_

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


class BadRequest(SidecarError):
    status = 400
    type = "invalid_request_error"
    outcome = Outcome.BAD_REQUEST


class PayloadTooLarge(BadRequest):
    status = 413
    code = "payload_too_large"


class RequestTimeout(BadRequest):
    status = 408
    code = "request_timeout"


class NotFound(BadRequest):
    status = 404
    code = "not_found"


class MethodNotAllowed(BadRequest):
    status = 405
    code = "method_not_allowed"


class Unauthorized(SidecarError):
    status = 401
    type = "invalid_request_error"
    outcome = Outcome.UNAUTHORIZED


class KeyNotValid(Unauthorized):
    """A real key (its secret verified) that is revoked or expired: its id is known, so the request's record
    names it (the error code says why it was refused)."""

    def __init__(self, message: str, key_id: str, *, code: str) -> None:
        super().__init__(message, code=code)
        self.key_id = key_id


class Forbidden(Unauthorized):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimited(SidecarError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    outcome = Outcome.RATE_LIMITED
    reason = ""  # which limit (sidecar_rate_limited_total): concurrency, rpm, tpm, budget, overloaded

    def __init__(self, message: str, *, reason: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.reason = reason or self.reason or ("tpm" if self.type == "tokens" else "rpm")


class InsufficientQuota(RateLimited):
    """The key's token budget for its period is used up (OpenAI's answer when an account's quota is)."""

    type = "insufficient_quota"
    code = "insufficient_quota"
    reason = "budget"


class Overloaded(RateLimited):
    status = 503
    type = "server_overloaded"
    code = "server_overloaded"
    reason = "overloaded"


class UpstreamError(SidecarError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    outcome = Outcome.UPSTREAM_ERROR


class UpstreamTimeout(SidecarError):
    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"
    outcome = Outcome.UPSTREAM_TIMEOUT


class StoreUnavailable(SidecarError):
    status = 503
    type = "server_error"
    code = "store_unavailable"
    outcome = Outcome.STORE_UNAVAILABLE


class ReportTooSlow(SidecarError):
    status = 503
    type = "server_error"
    code = "report_timeout"


class ShuttingDown(SidecarError):
    status = 503
    type = "server_shutting_down"
    code = "server_shutting_down"
    outcome = Outcome.SHUTDOWN


class UnsupportedMediaType(BadRequest):
    status = 415
    code = "unsupported_content_encoding"


# Anthropic's error types by status (docs.claude.com/en/api/errors): another 4xx is an invalid request, another
# 5xx an API error. 503 (our shutdown, a full pool) is Anthropic's "overloaded" (it says so with 529).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_body(err: SidecarError) -> bytes:
    """`err` in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`, which its SDKs parse."""
    kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": err.message}})


@dataclass(frozen=True, slots=True)
class Failure:
    """A transport or store failure as the client sees it."""

    error: SidecarError
    reason: UpstreamErrorReason | None  # its `sidecar_upstream_errors_total` reason; None: not counted there


def _deadline(exc: DeadlineExpired, _: bool) -> Failure:
    reason: UpstreamErrorReason = _TIMEOUT_REASONS[exc.reason]
    return Failure(UpstreamTimeout(f"The upstream did not answer in time ({exc})."), reason)


_TIMEOUT_REASONS: dict[str, UpstreamErrorReason] = {
    "first_byte": "timeout_first_byte",
    "idle": "timeout_idle",
    "total": "timeout_total",  # counted as idle once: the Literal makes such a slip a type error
}


def _store(exc: StoreError, changing: bool) -> Failure:
    if isinstance(exc, ReportTimeout):
        return Failure(ReportTooSlow("The report took too long and was stopped; ask for a shorter range."), None)
    retry = "nothing was changed" if changing else "retry shortly"
    return Failure(StoreUnavailable(f"The store is unavailable; {retry}."), None)


# First match wins: a subclass before its base.
_FAILURES: tuple[tuple[type[Exception], Callable[[Any, bool], Failure]], ...] = (
    (
        PoolExhausted,
        lambda e, _: Failure(
            Overloaded(f"The server is at capacity ({e}); retry shortly.", headers={"retry-after": "1"}), None
        ),
    ),
    (
        ConnectFailed,
        lambda e, _: Failure(
            UpstreamError(f"Cannot connect to the upstream: {e}.", code="upstream_unreachable"), "connect"
        ),
    ),
    (
        UpstreamBroke,
        lambda e, _: Failure(
            UpstreamError(f"The upstream connection broke mid-response: {e}", code="upstream_dropped"), "dropped"
        ),
    ),
    (UpstreamFailure, lambda e, _: Failure(UpstreamError(f"The upstream request failed: {e}."), "protocol")),
    (DeadlineExpired, _deadline),
    (TimeoutError, lambda e, _: Failure(UpstreamTimeout("The upstream did not answer in time."), None)),
    (StoreError, _store),
)
TRANSPORT_FAILURES = (UpstreamFailure, DeadlineExpired, TimeoutError)  # what a call to the upstream may raise


def failure(exc: Exception, *, changing: bool = False) -> Failure:
    """`exc`, a transport or store failure, as the client sees it (`changing`: the request meant to change
    something, so a store failure says nothing was). Anything else is a programming error: it is re-raised."""
    for kind, make in _FAILURES:
        if isinstance(exc, kind):
            return make(exc, changing)
    raise exc
