"""Audit capture: which requests are captured, and the record written for each (schema_version 1).

Policy: `audit.capture` is `off`, `store_flag` (requests whose body has `"store": true`) or `all`; a key's own
`audit` setting (`on`/`off`) overrides it. `sample_rate` keeps a deterministic fraction, decided from the
request id (same id, same decision), and does not apply to keys forced `on`.

The record holds the full request body and the response; a stream is aggregated into one
`chat.completion`-shaped object (content, reasoning, tool calls assembled from their deltas, finish reasons,
usage, per choice index: `sidecar.audit.aggregate`), with `complete: false` when the stream did not finish.
Headers follow an allowlist and credentials are always redacted; configured body paths (`messages[*].content`)
become a length + sha256 placeholder. Everything is bounded by `max_payload_bytes` before it is decoded: a
request is cut field by field (`shrink`), a response body is kept whole only up to the cap (`BodyCapture`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client.metrics_core import Metric

from sidecar.audit.aggregate import StreamCapture
from sidecar.config import AuditCfg
from sidecar.ops.logs import dumps
from sidecar.ops.series import counter
from sidecar.wire.headers import clean_text

log = logging.getLogger("sidecar.audit")
SCHEMA_VERSION = 1
REDACTED = "[REDACTED]"
_USAGE = (
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
    "usage_source",
)  # fmt: skip
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|token|secret|password|session", re.IGNORECASE)
_PATH_PART = re.compile(r"^([^\[\]]+)((?:\[(?:\*|\d+)\])*)$")


def sampled(request_id: str, rate: float) -> bool:
    """Deterministic sampling: the same request id always gets the same decision."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    value = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big")
    return value < rate * 2**64


class AuditPolicy:
    def __init__(self, cfg: AuditCfg) -> None:
        self.cfg = cfg
        self.paths = [parse_path(p) for p in cfg.redact_paths]

    def wants(self, request_id: str, key_audit: str | None, doc: dict[str, Any] | None) -> bool:
        if key_audit == "off":
            return False
        if key_audit == "on":
            return True
        capture = self.cfg.capture
        if capture == "off" or (capture == "store_flag" and not (doc is not None and doc.get("store") is True)):
            return False
        return sampled(request_id, self.cfg.sample_rate)

    def headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        allow = {h.lower() for h in self.cfg.header_allowlist}
        out = {}
        for name, value in headers.items():
            low = name.lower()
            if _SECRET_HEADER.search(low):
                out[low] = REDACTED  # even when allowlisted: credentials never reach a sink
            elif low in allow:
                out[low] = clean_text(value)  # a byte that is not UTF-8 (kept as a lone surrogate) as U+FFFD
        return out

    def redact(self, doc: Any) -> Any:
        for path in self.paths:
            doc = _redact(doc, path)
        return doc


def parse_path(text: str) -> list[str]:
    """`messages[*].content` -> ["messages", "*", "content"]."""
    steps: list[str] = []
    for part in text.split("."):
        m = _PATH_PART.match(part)
        if not m:
            raise ValueError(f"audit.redact_paths: cannot parse {text!r}")
        steps.append(m.group(1))
        steps.extend(re.findall(r"\[(\*|\d+)\]", m.group(2)))
    return steps


def placeholder(value: Any) -> dict[str, Any]:
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else _encoded(value) or b"null"
    return {"redacted": True, "length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _redact(doc: Any, path: list[str]) -> Any:
    if not path:
        return placeholder(doc)
    step, rest = path[0], path[1:]
    if isinstance(doc, dict) and step in doc:
        return {**doc, step: _redact(doc[step], rest)}
    if isinstance(doc, list) and (step == "*" or step.isdigit()):
        if step == "*":
            return [_redact(item, rest) for item in doc]
        i = int(step)
        return [(_redact(item, rest) if n == i else item) for n, item in enumerate(doc)]
    return doc


def build_record(
    *,
    rec: Mapping[str, Any],
    endpoint: str,
    request_headers: dict[str, str],
    request_body: Any,
    response: Any,
    complete: bool,
    cap: int,
    request_digest: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """The audit record for one request and its JSON line, within `cap` bytes: over it, the request and the
    response are cut field by field (`shrink`); only if that is not enough, or if they cannot be encoded at all
    (nested deeper than JSON encoders go), are they left out (metadata stays)."""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": rec["request_id"],
        "key_id": rec.get("key_id"),
        "model": rec.get("model"),
        "endpoint": endpoint,
        "stream": rec.get("stream"),
        "outcome": rec.get("outcome"),
        "status": rec.get("status"),
        "usage": {k: rec.get(k) for k in _USAGE},
        "timings": {k: rec.get(k) for k in ("started_at", "finished_at", "ttft_ms", "latency_ms")},
        "emitted_at": time.time(),
        "complete": complete,
        "truncated": False,
        "request": {"headers": request_headers, "body": request_body, **(request_digest or {})},
        "response": response,
    }
    line = _encoded(record)
    if line is None or len(line) > cap:
        record["request"]["body"] = shrink(request_body, cap // 3)
        record["response"] = shrink(response, cap // 3)
        record["truncated"] = True
        line = _encoded(record)
    if line is None or len(line) > cap:
        record["request"] = {"headers": request_headers, "body": None, **(request_digest or {})}
        record["response"] = None
        record["truncated"] = True
        line = dumps(record)  # metadata only: always encodable
    return record, line + b"\n"


def _encoded(doc: Any) -> bytes | None:
    """`doc` as JSON (text that is not valid UTF-8 with U+FFFD: `sidecar.ops.logs.dumps`); None for a doc nested
    too deeply to encode, which the record then cuts or leaves out, like one over the cap."""
    try:
        return dumps(doc)
    except TypeError:
        return None


def shrink(doc: Any, budget: int) -> Any:
    """`doc` cut to about `budget` bytes of JSON, field by field: a long string keeps its start and its end and
    says its length and sha256; a long array keeps its first and last items and says how many it had (the last
    messages of a conversation are the ones just sent). Every key stays, so padding one field, or a conversation
    with many small messages, cannot push the rest of a request out of the record."""
    limit = max(64, budget // 4)
    while True:
        out = _cut(doc, limit, max(8, limit // 16))
        if limit <= 64:
            return out
        encoded = _encoded(out)
        if encoded is not None and len(encoded) <= budget:
            return out
        limit //= 2


def _cut(value: Any, limit: int, items: int) -> Any:
    if isinstance(value, str):
        if len(value) <= limit:
            return value
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        half = limit // 2
        return {
            "truncated": True,
            "length": len(value),
            "sha256": digest,
            "prefix": value[:half],
            "suffix": value[-half:],
        }
    if isinstance(value, list):
        if len(value) <= items:
            return [_cut(v, limit, items) for v in value]
        head, tail = value[: items // 2], value[len(value) - items // 2 :]
        marker = {"truncated": True, "items": len(value), "omitted": len(value) - len(head) - len(tail)}
        return [*(_cut(v, limit, items) for v in head), marker, *(_cut(v, limit, items) for v in tail)]
    if isinstance(value, dict):
        return {k: _cut(v, limit, items) for k, v in value.items()}
    return value


class BodyCapture:
    """A response body as audit keeps it: whole (decoded) up to the payload cap, else its first `cap` bytes with
    its length and sha256, so a huge answer costs at most the cap and is never decoded whole."""

    def __init__(self, cap: int, digest_only: bool = False) -> None:
        self.cap = cap
        self.digest_only = digest_only  # redact_paths are set: a raw prefix could not be redacted, so none is kept
        self._parts: list[bytes] = []
        self._kept = 0
        self.length = 0
        self._sha = hashlib.sha256()

    @classmethod
    def whole(cls, body: bytes, cap: int, digest_only: bool = False) -> Any:
        if len(body) <= cap:
            return _json_or_text(body)
        capture = cls(cap, digest_only)
        capture.add(body)
        return capture.result()

    def add(self, data: bytes) -> None:
        self.length += len(data)
        self._sha.update(data)
        if self._kept < self.cap:
            part = data[: self.cap - self._kept]
            self._parts.append(part)
            self._kept += len(part)

    def result(self) -> Any:
        body = b"".join(self._parts)
        if self.length <= self.cap:
            return _json_or_text(body)
        out: dict[str, Any] = {"truncated": True, "length": self.length, "sha256": self._sha.hexdigest()}
        if not self.digest_only:
            out["prefix"] = body.decode("utf-8", "replace")
        return out


def _json_or_text(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


@dataclass
class Capture:
    """What the proxy keeps for one audited request until its record is built."""

    headers: dict[str, str]
    body: Any
    digest: dict[str, Any]  # the raw body's length and sha256: what it was, even when the body is cut
    stream: StreamCapture | None = None


class Auditor:
    """Decides per request, captures the request, and hands finished records to `emit` (the sink bus)."""

    def __init__(self, cfg: AuditCfg, emit: Callable[[dict[str, Any], bytes], None]) -> None:
        self.policy = AuditPolicy(cfg)
        self.cap = cfg.max_payload_bytes
        self.emit = emit
        self.unencodable = 0

    def capture(
        self,
        request_id: str,
        key_audit: str | None,
        headers: Mapping[str, str],
        doc: dict[str, Any] | None,
        body: bytes = b"",
    ) -> Capture | None:
        """What to keep of an audited request (None: not audited). A body over half the payload cap is cut field by
        field at once, so a padded request costs the cap, not its size, while the proxy waits for the answer."""
        if not self.policy.wants(request_id, key_audit, doc):
            return None
        kept = self.policy.redact(doc)
        if len(body) > self.cap // 2:
            kept = shrink(kept, self.cap // 2)
        digest = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        return Capture(self.policy.headers(headers), kept, digest)

    def finish(self, capture: Capture, row: Mapping[str, Any], response: Any, complete: bool) -> None:
        """Build and emit the record; a streamed response is the aggregate of `capture.stream`. Never raises: a
        request or response that cannot be encoded or cut (nested too deeply) is left out of the record, which
        keeps its metadata and is counted (`sidecar_audit_unencodable`)."""
        try:
            if capture.stream is not None:
                response = capture.stream.result()
            record, line = self._build(capture, row, self.policy.redact(response), complete, self.cap)
        except Exception as exc:  # the request is answered already: the audit must not turn it into a 500
            self.unencodable += 1
            fields = {"request_id": row.get("request_id"), "error": type(exc).__name__}
            log.warning("audit record kept without its bodies: they could not be encoded", extra={"fields": fields})
            record, line = self._build(capture, row, None, complete, 0)  # a cap of 0: the metadata, `truncated`
        self.emit(record, line)

    def _build(
        self, capture: Capture, row: Mapping[str, Any], response: Any, complete: bool, cap: int
    ) -> tuple[dict[str, Any], bytes]:
        return build_record(
            rec=row,
            endpoint=str(row.get("path")),
            request_headers=capture.headers,
            request_body=capture.body if cap else None,
            response=response,
            complete=complete,
            cap=cap,
            request_digest=capture.digest,
        )

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_audit_unencodable",
            "Audit records written without their request and response, which could not be encoded.",
            (),
            {(): self.unencodable},
        )
