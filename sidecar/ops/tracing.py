"""Tracing: one OpenTelemetry server span per proxied request, exported over OTLP, off by default.

Off (the default) nothing of OpenTelemetry is imported and the proxy holds `None`: no span objects, no exporter,
no per-request work. On (`[tracing] enabled`, or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set), each request gets a span named by the GenAI conventions (`chat
{model}`, `text_completion {model}`, `embeddings {model}`; other routes `{method} {route}`), continuing a
client's W3C `traceparent`/`tracestate` (parent-based sampling), and the upstream request carries the span's
context so the model server's spans join the trace. Spans are batched by the SDK's BatchSpanProcessor and
exported from its own thread; its queue is bounded, and a span that does not fit is dropped here, before the
SDK would (which logs a line per span), and counted: an exporter that is down or slow costs requests nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict
from prometheus_client.metrics_core import Metric

from sidecar.audit.capture import AuditPolicy
from sidecar.config import AuditCfg, ConfigError, TracingCfg, mask_url
from sidecar.ops.series import counter
from sidecar.records.record import Outcome, RequestRecord
from sidecar.wire.routes import CHAT, COMPLETIONS, EMBEDDINGS, GENERATE, MESSAGES, NATIVE, RESPONSES

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, Span, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger("sidecar.tracing")

# The GenAI operation of each family that has one (the rest are named by method and route).
OPERATIONS = {
    CHAT: "chat",
    MESSAGES: "chat",
    RESPONSES: "chat",
    COMPLETIONS: "text_completion",
    NATIVE: "text_completion",
    GENERATE: "text_completion",
    EMBEDDINGS: "embeddings",
}
# Outcomes that end a span in error (besides a 5xx status), with their `error.type`.
_ERRORS = {
    Outcome.CLIENT_DISCONNECTED: "client_disconnected",
    Outcome.UPSTREAM_ERROR: "upstream_error",
    Outcome.UPSTREAM_TIMEOUT: "timeout",
    Outcome.STORE_UNAVAILABLE: "store_unavailable",
    Outcome.SHUTDOWN: "shutdown",
}


def wanted(cfg: TracingCfg, env: Mapping[str, str]) -> bool:
    """Whether tracing is on: the config says so, or the standard OTLP endpoint variables are set (unless the
    standard switches turn the SDK or the traces exporter off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return cfg.enabled or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def require_sdk() -> None:
    """One clear start-up error when tracing is asked for and OpenTelemetry's SDK or its OTLP exporter is not
    installed (they are the `otel` extra: the sidecar runs without them while tracing is off)."""
    missing = []
    for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise ConfigError(
            "tracing is on (tracing.enabled or an OTEL_EXPORTER_OTLP_*ENDPOINT variable) but OpenTelemetry is not "
            f"installed ({', '.join(missing)}): install the extra, pip install 'sidecar[otel]'"
        )


def _bounded(inner: BatchSpanProcessor, queue_size: int) -> Any:
    """The SDK's BatchSpanProcessor, with spans beyond its queue dropped and counted here (the SDK would log a
    line per dropped span). Built here, not at import: nothing of OpenTelemetry loads while tracing is off."""
    from opentelemetry.sdk.trace import SpanProcessor

    # The SDK (1.34 and later) keeps its queue on an internal object; without it spans are only delegated.
    queue: Sequence[Any] | None = getattr(getattr(inner, "_batch_processor", None), "_queue", None)

    class Bounded(SpanProcessor):
        ended = 0
        dropped = 0

        def on_end(self, span: ReadableSpan) -> None:
            self.ended += 1
            if queue is not None and len(queue) >= queue_size:
                self.dropped += 1
                return
            inner.on_end(span)

        def shutdown(self) -> None:
            inner.shutdown()  # type: ignore[no-untyped-call]

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(inner.force_flush(timeout_millis))

    return Bounded()


def _counting(exporter: Any) -> Any:
    """The exporter, counting the spans of every batch it could not deliver (collector down, refused, slow)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Counting(SpanExporter):
        failed = 0

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            result: SpanExportResult = SpanExportResult.FAILURE  # until the exporter says otherwise (it may raise)
            try:
                result = exporter.export(spans)
            finally:
                if result is not SpanExportResult.SUCCESS:
                    self.failed += len(spans)
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(exporter.force_flush(timeout_millis))

    return Counting()


class Tracing:
    def __init__(self, cfg: TracingCfg, env: Mapping[str, str], audit: AuditCfg | None = None) -> None:
        self.cfg = cfg
        self.env = env
        audit = audit or AuditCfg()
        # Content on spans only when asked for, and then as the audit capture would keep it.
        self.content = AuditPolicy(audit) if cfg.capture_content else None
        self.content_cap = audit.max_payload_bytes
        self._provider: TracerProvider | None = None
        self._processor: Any = None
        self.end_errors = 0
        self._exporter: Any = None
        self._tracer: Any = None
        self._propagator: Any = None
        self._kind: Any = None
        self._status: Any = None

    def start(self) -> None:
        """Build the provider, the exporter and the batch processor (the SDK reads the `OTEL_*` variables)."""
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from sidecar import __version__

        cfg, env = self.cfg, self.env
        attributes: dict[str, str] = {"service.version": __version__}
        named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        if cfg.service_name or not named:
            attributes["service.name"] = cfg.service_name or "sidecar"
        resource = Resource.create(attributes)  # with OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        sampler = None if env.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(cfg.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler, id_generator=_fast_ids())
        delay = None if env.get("OTEL_BSP_SCHEDULE_DELAY") else cfg.export_delay * 1000.0
        self._exporter = _counting(_exporter(cfg, env))
        batch = BatchSpanProcessor(
            self._exporter,
            max_queue_size=cfg.queue_size,
            schedule_delay_millis=delay,
            max_export_batch_size=min(512, cfg.queue_size),  # the SDK's default, within the queue
        )
        self._processor = _bounded(batch, cfg.queue_size)
        provider.add_span_processor(self._processor)
        self._provider = provider
        self._tracer = provider.get_tracer("sidecar", __version__)
        self._propagator = CompositePropagator([TraceContextTextMapPropagator()])
        self._kind = SpanKind.SERVER
        self._status = (Status, StatusCode)
        log.info("tracing on", extra={"fields": {"endpoint": mask_url(_endpoint_text(cfg, env))}})

    def close(self) -> None:
        """Export what is queued, then stop, waiting at most the export timeout (the SDK would wait 30 s for
        its worker): what is not out by then is left to the daemon thread and lost at exit. Blocks: run it in
        a thread."""
        provider, self._provider = self._provider, None
        if provider is not None:
            stopping = threading.Thread(target=provider.shutdown, name="sidecar-tracing-shutdown", daemon=True)
            stopping.start()
            stopping.join(self.cfg.export_timeout + 1.0)

    def begin(self, headers: Mapping[str, str], method: str, route: str | None, start_ns: int) -> Span:
        """A server span for a request, continuing the client's trace context when it sent one. `route`: the
        path when it is one of ours, else None (the name stays bounded whatever clients send)."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        attributes = {"http.request.method": method, **({"http.route": route} if route else {})}
        span: Span = self._tracer.start_span(
            f"{method} {route}" if route else method, context=parent, kind=self._kind, start_time=start_ns,
            attributes=attributes,
        )  # fmt: skip
        return span

    def admitted(
        self, span: Span, family: str, model: str | None, max_tokens: int | None, waited_ms: float, doc: Any = None
    ) -> None:
        """Name the span by its GenAI operation once the body is read, note the lease wait, and (opted in) the
        prompt."""
        operation = OPERATIONS.get(family)
        if operation is not None:
            span.update_name(f"{operation} {model}" if model else operation)
            span.set_attribute("gen_ai.operation.name", operation)
        if model:
            span.set_attribute("gen_ai.request.model", model)
        if max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", max_tokens)
        if waited_ms > 0:
            span.add_event("sidecar.lease.waited", {"sidecar.lease.wait_ms": round(waited_ms, 3)})
        if self.content is not None and isinstance(doc, dict) and span.is_recording():
            prompt = {k: doc[k] for k in ("messages", "prompt", "input", "instructions") if k in doc}
            if prompt:
                span.set_attribute("gen_ai.input.messages", self._text(self.content.redact(prompt)))

    def inject(self, span: Span, headers: MutableMapping[str, str]) -> None:
        """The span's context in the upstream request's headers (replacing the client's own), in W3C Trace
        Context's one format (the propagator's inject costs a context object per request for the same line)."""
        for name in ("traceparent", "tracestate"):
            if isinstance(headers, CIMultiDict):
                headers.popall(name, None)  # every copy a client sent
            else:
                headers.pop(name, None)
        ctx = span.get_span_context()
        if ctx.is_valid:
            headers["traceparent"] = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
            if ctx.trace_state:
                headers["tracestate"] = ctx.trace_state.to_header()

    def end(self, span: Span, rec: RequestRecord, server: str) -> None:
        """End the span with what the record says (never raises: a tracing fault must not touch the request)."""
        try:
            if span.is_recording():
                self._describe(span, rec, server)
            span.end(end_time=int(rec.started_at * 1e9) + int(rec.latency_ms * 1e6))
        except Exception:  # the SDK's, or ours: counted and logged, and the request goes on
            self.end_errors += 1
            log.exception("a span could not be ended")

    def _describe(self, span: Span, rec: RequestRecord, server: str) -> None:
        attributes: dict[str, Any] = {
            "http.response.status_code": rec.status,
            "server.address": server,
            "sidecar.request_id": rec.request_id,
            "sidecar.outcome": str(rec.outcome),
            "sidecar.usage_source": rec.usage_source,
        }
        if rec.key_id is not None:
            attributes["sidecar.key_id"] = rec.key_id
        if rec.stream:
            attributes["gen_ai.request.stream"] = True
        if rec.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = rec.prompt_tokens
        if rec.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = rec.completion_tokens
        for name, value in (
            ("gen_ai.usage.cache_read.input_tokens", rec.cached_tokens),
            ("gen_ai.usage.cache_creation.input_tokens", rec.cache_write_tokens),
            ("gen_ai.usage.reasoning.output_tokens", rec.reasoning_tokens),
        ):
            if value is not None:  # only what the upstream said
                attributes[name] = value
        if rec.response_model:
            attributes["gen_ai.response.model"] = rec.response_model
        if rec.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = rec.finish_reasons
        if self.content is not None and rec.output is not None:
            attributes["gen_ai.output.messages"] = self._text(self.content.redact({"choices": rec.output}))
        error = _ERRORS.get(rec.outcome)
        if error is None and rec.status >= 400:
            error = str(rec.status)
        if rec.status == 0:  # the handler raised before any answer: aiohttp answers 500
            error = "internal_error"
        if error is not None:
            attributes["error.type"] = error
        span.set_attributes(attributes)
        start_ns = int(rec.started_at * 1e9)
        if rec.ttft_ms is not None and rec.stream:
            span.add_event("gen_ai.first_token", timestamp=start_ns + int(rec.ttft_ms * 1e6))
        if error is not None and (rec.status >= 500 or rec.status == 0 or rec.outcome in _ERRORS):
            status, code = self._status
            span.set_status(status(code.ERROR, rec.error_code or error))

    def _text(self, doc: Any) -> str:
        text = orjson.dumps(doc, default=str).decode()
        return text if len(text) <= self.content_cap else text[: self.content_cap] + "...(cut)"

    def collect(self) -> Iterator[Metric]:
        p, e = self._processor, self._exporter
        ended, dropped = (p.ended, p.dropped) if p is not None else (0, 0)
        yield counter(
            "sidecar_trace_spans",
            "Spans ended, by what became of them here: queued for export or dropped (queue full); `failed` counts "
            "queued spans whose export failed (collector down, refusing or too slow).",
            ("result",),
            {
                ("queued",): ended - dropped,
                ("dropped",): dropped,
                ("failed",): e.failed if e is not None else 0,
                ("error",): self.end_errors,  # could not be ended (a fault in tracing itself): logged too
            },
        )


def _fast_ids() -> Any:
    """Trace and span ids from Python's Mersenne Twister, as the SDK's RandomIdGenerator made them before it
    moved to os.urandom (a system call per id: about 12 µs a span here). Ids need to be unique, not secret."""
    import random

    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import INVALID_SPAN_ID, INVALID_TRACE_ID

    class FastIds(IdGenerator):
        def generate_span_id(self) -> int:
            span_id = random.getrandbits(64)
            while span_id == INVALID_SPAN_ID:
                span_id = random.getrandbits(64)
            return span_id

        def generate_trace_id(self) -> int:
            trace_id = random.getrandbits(128)
            while trace_id == INVALID_TRACE_ID:
                trace_id = random.getrandbits(128)
            return trace_id

    return FastIds()


def _exporter(cfg: TracingCfg, env: Mapping[str, str]) -> Any:
    """OTLP over HTTP/protobuf, or gRPC when asked for and installed; the endpoint from the config, else the
    SDK's own reading of the OTEL_* variables."""
    protocol = cfg.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    timeout = cfg.export_timeout
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as Grpc,
            )
        except ImportError:
            log.warning("OTLP gRPC exporter not installed (pip install 'sidecar[otel,grpc]'): using HTTP/protobuf")
        else:
            return Grpc(endpoint=cfg.endpoint or None, timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=cfg.endpoint or None, timeout=timeout)


def _endpoint_text(cfg: TracingCfg, env: Mapping[str, str]) -> str:
    return (
        cfg.endpoint
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or (env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces")
    )
