"""Audit capture: which requests are captured, and the record written for each (schema_version 1).

Policy: `audit.capture` is `off`, `store_flag` (requests whose body has `"store": true`) or `all`; a key's own
`audit` setting (`on`/`off`) overrides it. `sample_rate` keeps a deterministic fraction, decided from the
request id (same id, same decision), and does not apply to keys forced `on`.

The record holds the full request body and the response; a stream is aggregated into one
`chat.completion`-shaped object (content, reasoning, tool calls assembled from their deltas, finish reasons,
usage, per choice index), with `complete: false` when the stream did not finish. Headers follow an allowlist
and credentials are always redacted; configured body paths (`messages[*].content`) become a length + sha256
placeholder; a record over the payload cap keeps its metadata and says it was truncated.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar.config import AuditCfg

SCHEMA_VERSION = 1
REDACTED = "[REDACTED]"
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
                out[low] = value
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
    raw = value.encode() if isinstance(value, str) else orjson.dumps(value)
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


class Aggregate:
    """Stream events folded into one chat.completion / text_completion-shaped object, per choice index."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.text_completion = False

    def add(self, event: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: event[k] for k in ("id", "created", "model", "system_fingerprint") if k in event}
            self.text_completion = event.get("object") == "text_completion"
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            if isinstance(choice, dict):
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        slot = self.choices.setdefault(
            index,
            {
                "index": index,
                "content": [],
                "reasoning": [],
                "tools": {},
                "role": "assistant",
                "finish_reason": None,
                "text": [],
            },
        )
        if choice.get("finish_reason") is not None:
            slot["finish_reason"] = choice["finish_reason"]
        if "text" in choice and isinstance(choice["text"], str):
            slot["text"].append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        if isinstance(delta.get("role"), str):
            slot["role"] = delta["role"]
        if isinstance(delta.get("content"), str):
            slot["content"].append(delta["content"])
        for key in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(key), str):
                slot["reasoning"].append(delta[key])
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                self._tool(slot["tools"], call)

    @staticmethod
    def _tool(tools: dict[int, dict[str, Any]], call: dict[str, Any]) -> None:
        entry = tools.setdefault(
            call.get("index", len(tools)), {"id": None, "type": "function", "name": [], "arguments": []}
        )
        if call.get("id"):
            entry["id"] = call["id"]
        if call.get("type"):
            entry["type"] = call["type"]
        function = call.get("function") or {}
        if isinstance(function.get("name"), str):
            entry["name"].append(function["name"])
        if isinstance(function.get("arguments"), str):
            entry["arguments"].append(function["arguments"])

    def result(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            if self.text_completion:
                choices.append({"index": index, "text": "".join(slot["text"]), "finish_reason": slot["finish_reason"]})
                continue
            message: dict[str, Any] = {"role": slot["role"], "content": "".join(slot["content"]) or None}
            if slot["reasoning"]:
                message["reasoning_content"] = "".join(slot["reasoning"])
            if slot["tools"]:
                message["tool_calls"] = [
                    {
                        "id": t["id"],
                        "type": t["type"],
                        "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])},
                    }
                    for _, t in sorted(slot["tools"].items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": slot["finish_reason"]})
        obj = "text_completion" if self.text_completion else "chat.completion"
        return {**self.head, "object": obj, "choices": choices, "usage": self.usage}


def build_record(
    *,
    rec: Mapping[str, Any],
    endpoint: str,
    request_headers: dict[str, str],
    request_body: Any,
    response: Any,
    complete: bool,
    cap: int,
) -> tuple[dict[str, Any], bytes]:
    """The audit record for one request and its JSON line, capped at `cap` bytes (metadata always kept)."""
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "request_id": rec["request_id"],
        "key_id": rec.get("key_id"),
        "model": rec.get("model"),
        "endpoint": endpoint,
        "stream": rec.get("stream"),
        "outcome": rec.get("outcome"),
        "status": rec.get("status"),
        "usage": {
            k: rec.get(k)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "usage_source")
        },
        "timings": {k: rec.get(k) for k in ("started_at", "finished_at", "ttft_ms", "latency_ms")},
        "emitted_at": time.time(),
        "complete": complete,
        "truncated": False,
        "request": {"headers": request_headers, "body": request_body},
        "response": response,
    }
    line = orjson.dumps(record, default=str)
    if len(line) > cap:
        record["request"] = {"headers": request_headers, "body": None}
        record["response"] = None
        record["truncated"] = True
        line = orjson.dumps(record, default=str)
    return record, line + b"\n"


@dataclass
class Capture:
    """What the proxy keeps for one audited request until its record is built."""

    headers: dict[str, str]
    body: Any


class Auditor:
    """Decides per request, captures the request, and hands finished records to `emit` (the sink bus)."""

    def __init__(self, cfg: AuditCfg, emit: Callable[[dict[str, Any], bytes], None]) -> None:
        self.policy = AuditPolicy(cfg)
        self.cap = cfg.max_payload_bytes
        self.emit = emit

    def capture(
        self, request_id: str, key_audit: str | None, headers: Mapping[str, str], doc: dict[str, Any] | None
    ) -> Capture | None:
        if not self.policy.wants(request_id, key_audit, doc):
            return None
        return Capture(self.policy.headers(headers), self.policy.redact(doc))

    def finish(
        self,
        capture: Capture,
        row: Mapping[str, Any],
        response: Any,
        events: list[dict[str, Any]] | None,
        complete: bool,
    ) -> None:
        if events is not None:
            agg = Aggregate()
            for event in events:
                agg.add(event)
            response = agg.result()
        record, line = build_record(
            rec=row,
            endpoint=str(row.get("path")),
            request_headers=capture.headers,
            request_body=capture.body,
            response=self.policy.redact(response),
            complete=complete,
            cap=self.cap,
        )
        self.emit(record, line)
