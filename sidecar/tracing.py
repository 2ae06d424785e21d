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

import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric

from sidecar.config import TracingCfg, mask_url
from sidecar.records import Outcome, RequestRecord
from sidecar.routes import CHAT, COMPLETIONS, EMBEDDINGS, GENERATE, MESSAGES, NATIVE, RESPONSES
from sidecar.series import counter

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


def _bounded(inner: BatchSpanProcessor, queue_size: int) -> Any:
    """The SDK's BatchSpanProcessor, with spans beyond its queue dropped and counted here (the SDK would log a
    line per dropped span). Built here, not at import: nothing of OpenTelemetry loads while tracing is off."""
    from opentelemetry.sdk.trace import SpanProcessor

    # The SDK keeps its queue on an internal object; without it (another SDK version) spans are only delegated.
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


class Tracing:
    def __init__(self, cfg: TracingCfg, env: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.env = env
        self._provider: TracerProvider | None = None
        self._processor: Any = None
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
        if cfg.service_name or not env.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = cfg.service_name or "sidecar"
        resource = Resource.create(attributes)  # with OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        sampler = None if env.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(cfg.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        delay = None if env.get("OTEL_BSP_SCHEDULE_DELAY") else cfg.export_delay * 1000.0
        batch = BatchSpanProcessor(
            _exporter(cfg, env),
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
        """Export what is queued (bounded by the export timeout), then stop. Runs in a thread: it blocks."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    def begin(self, headers: Mapping[str, str], method: str, path: str, start_ns: int) -> Span:
        """A server span for a request, continuing the client's trace context when it sent one."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        span: Span = self._tracer.start_span(
            f"{method} {path}", context=parent, kind=self._kind, start_time=start_ns,
            attributes={"http.request.method": method, "url.path": path},
        )  # fmt: skip
        return span

    def admitted(self, span: Span, family: str, model: str | None, max_tokens: int | None, waited_ms: float) -> None:
        """Name the span by its GenAI operation once the body is read, and note the lease wait."""
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

    def inject(self, span: Span, headers: MutableMapping[str, str]) -> None:
        """The span's context in the upstream request's headers (replacing the client's own)."""
        from opentelemetry.trace import set_span_in_context

        for name in ("traceparent", "tracestate"):
            headers.pop(name, None)
        self._propagator.inject(headers, context=set_span_in_context(span))

    def end(self, span: Span, rec: RequestRecord, server: str) -> None:
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
        if rec.response_model:
            attributes["gen_ai.response.model"] = rec.response_model
        if rec.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = rec.finish_reasons
        error = _ERRORS.get(rec.outcome)
        if error is None and rec.status >= 400:
            error = str(rec.status)
        if error is not None:
            attributes["error.type"] = error
        span.set_attributes(attributes)
        start_ns = int(rec.started_at * 1e9)
        if rec.ttft_ms is not None and rec.stream:
            span.add_event("gen_ai.first_token", timestamp=start_ns + int(rec.ttft_ms * 1e6))
        if error is not None and (rec.status >= 500 or rec.outcome in _ERRORS):
            status, code = self._status
            span.set_status(status(code.ERROR, rec.error_code or error))
        span.end(end_time=start_ns + int(rec.latency_ms * 1e6))

    def collect(self) -> Iterator[Metric]:
        p = self._processor
        ended, dropped = (p.ended, p.dropped) if p is not None else (0, 0)
        yield counter(
            "sidecar_trace_spans",
            "Spans ended, by what became of them at this end: queued for export, or dropped (queue full).",
            ("result",),
            {("queued",): ended - dropped, ("dropped",): dropped},
        )


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
            log.warning("OTLP gRPC exporter not installed (pip install 'sidecar[grpc]'): using HTTP/protobuf")
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
