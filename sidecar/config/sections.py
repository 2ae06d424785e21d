"""The settings: one frozen dataclass per section of `sidecar.toml` (`ServerCfg`, `UpstreamCfg`, ...), each option
with its default, and `Settings`, all of them; `ConfigError` is the one-line error every bad value raises."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """An invalid option: the message is one line, `section.option: reason`."""


@dataclass(frozen=True)
class ServerCfg:
    host: str = "127.0.0.1"
    port: int = 8080
    ops_port: int = 0  # /metrics, /admin/*, /drain on their own port; 0: all on `port`
    data_dir: str = "./data"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    request_log: str = "stderr"
    log_flush_ms: int = 100
    max_body_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 64
    keepalive_timeout: float = 75.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    drain_grace: float = 5.0
    drain_timeout: float = 30.0
    reject_rows_per_minute: int = 60
    trusted_proxies: tuple[str, ...] = ()
    server_header: str = ""
    cors_origins: tuple[str, ...] = ()
    admin_token: str = field(default="", metadata={"secret": True})
    admin_token_file: str = ""
    overhead_header: bool = False  # x-sidecar-overhead-ms on answers: the sidecar's own time before they began
    sse_keepalive: float = 0.0  # seconds between SSE comments to a stream waiting in the dispatch queue; 0: off
    workers: int = 1  # processes serving `port` together (SO_REUSEPORT); limits hold for all of them (README)


@dataclass(frozen=True)
class UpstreamCfg:
    url: str = ""
    kind: Literal["openai", "vllm", "llama.cpp", "sglang", "custom"] = "openai"
    routes: tuple[str, ...] = ()
    api_key: str = field(default="", metadata={"secret": True})
    api_key_file: str = ""
    connect_timeout: float = 5.0
    first_byte_timeout: float = 600.0
    stream_idle_timeout: float = 120.0
    total_timeout: float = 0.0
    keepalive_timeout: float = 4.0
    pool_size: int = 256
    max_connections: int = 0
    health_path: str = "/health"
    health_timeout: float = 2.0
    max_response_bytes: int = 256 * 1024 * 1024
    extra_paths: tuple[str, ...] = ()
    metrics_path: str = "/metrics"  # the upstream's Prometheus page, served on the ops port at /metrics/upstream
    metrics_cache: float = 2.0  # seconds one fetch of it answers every scrape
    cache_salt: Literal["off", "key"] = "off"  # "key": vLLM's prefix cache salted per key or cache_group (README)


@dataclass(frozen=True)
class StoreCfg:
    url: str = ""  # empty: default_store_url(server.data_dir), a SQLite file there
    pool_size: int = 4
    op_timeout: float = 10.0
    retention: str = "90d"
    retention_interval: float = 600.0
    report_timeout: float = 10.0
    report_max_days: int = 366


@dataclass(frozen=True)
class AuthCfg:
    enabled: bool = True
    pepper: str = field(default="", metadata={"secret": True})
    pepper_file: str = ""
    pepper_rotate: bool = False  # serve: adopt a pepper that differs from the store's fingerprint (a rotation)
    static_keys_file: str = ""
    cache_ttl: float = 5.0
    max_stale: float = 300.0
    lookup_timeout: float = 1.0  # the longest a request waits for the key store
    unknown_key_rate: int = 60  # lookups of key ids this replica does not hold, per client address a minute; 0: any


@dataclass(frozen=True)
class LimitsCfg:
    concurrency: int = 256
    rpm: int = 0
    tpm: int = 0
    default_max_tokens: int = 1024
    enforce_max_tokens: bool = False  # write default_max_tokens into a request that names no output cap
    media_tokens: int = 1024  # the prompt estimate of one image, audio or video item
    global_concurrency: int = 1024
    queue_size: int = 256
    queue_timeout: float = 30.0
    queue_order: Literal["fair", "fifo"] = "fair"  # who goes next from the queue (limits/queue.py)
    forward_priority: bool = False  # the key's class into vLLM's `priority` (--scheduling-policy priority)
    saturation: Literal["off", "metrics"] = "off"  # metrics: the dispatch limit follows the engine's own queue
    saturation_interval: float = 0.25  # seconds between readings of the engine's metrics page (at most 0.25)
    saturation_waiting: int = 0  # requests the engine may keep waiting in its own queue before dispatch holds
    saturation_kv: float = 0.95  # the engine's KV-cache use (0-1) above which dispatch holds
    timezone: str = "UTC"  # where a key's `day`, `week` and `month` budget periods begin
    store_down: str = "local"  # shared store unreachable: "local" (this replica's own limits) or "reject" (503)
    budget_metrics_refresh: float = 15.0  # seconds a scrape's budget figures are kept before the store is read again


@dataclass(frozen=True)
class WriterCfg:
    max_rows: int = 500
    flush_interval_ms: int = 200
    queue_size: int = 100_000
    spool: bool = True
    spool_max_bytes: int = 1024 * 1024 * 1024
    spool_segment_bytes: int = 16 * 1024 * 1024
    drain_timeout: float = 10.0


@dataclass(frozen=True)
class AuditCfg:
    capture: Literal["off", "store_flag", "all"] = "off"
    sample_rate: float = 1.0
    sinks: tuple[str, ...] = ("jsonl",)
    jsonl_dir: str = ""
    jsonl_max_bytes: int = 64 * 1024 * 1024
    jsonl_max_age: float = 3600.0
    jsonl_gzip: bool = False
    jsonl_retention: str = "90d"  # segments last written longer ago are deleted; "0" keeps them all
    queue_size: int = 10_000
    max_payload_bytes: int = 1024 * 1024
    header_allowlist: tuple[str, ...] = ("content-type", "user-agent", "x-request-id", "openai-organization")
    redact_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class TracingCfg:
    enabled: bool = False  # also on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set
    endpoint: str = ""  # the OTLP traces URL; "": the OTEL_* variables, else http://localhost:4318/v1/traces
    protocol: str = ""  # "http/protobuf" (default) or "grpc" (with the grpc extra); "": OTEL_EXPORTER_OTLP_PROTOCOL
    service_name: str = ""  # "": OTEL_SERVICE_NAME, else "sidecar"
    sample_ratio: float = 1.0  # parent-based: a client's sampled flag wins; OTEL_TRACES_SAMPLER replaces this
    queue_size: int = 2048  # spans waiting for export; beyond it they are dropped and counted
    export_delay: float = 5.0  # seconds between batches (the SDK's default; OTEL_BSP_SCHEDULE_DELAY replaces it)
    export_timeout: float = 10.0
    # Prompt and answer content on spans (gen_ai.input.messages, gen_ai.output.messages), redacted by
    # audit.redact_paths and cut to audit.max_payload_bytes. Off: spans never carry content.
    capture_content: bool = False


@dataclass(frozen=True)
class ConsoleCfg:
    enabled: bool = False  # the web console at /console/ on the client port
    session_ttl: float = 1800.0  # seconds a signed-in session lasts without use
    session_max_age: float = 43200.0  # and at most this long however much it is used
    max_sessions: int = 10_000
    secure_cookie: Literal["auto", "always", "never"] = "auto"  # auto: TLS here or https from a trusted proxy
    # OpenID Connect sign-in for operators (sidecar/admin/oidc.py); off while oidc_issuer is "".
    oidc_issuer: str = ""  # e.g. https://login.example.com/realms/platform (its discovery document is read)
    oidc_client_id: str = ""
    oidc_client_secret_file: str = ""  # a confidential client: the secret from a file (a mounted Secret)
    oidc_operator_claim: str = ""  # CLAIM=VALUE that makes an operator, e.g. groups=platform
    oidc_viewer_claim: str = ""  # CLAIM=VALUE that makes a read-only operator
    oidc_scopes: tuple[str, ...] = ("openid", "email", "profile")


@dataclass(frozen=True)
class ExportCfg:
    url: str = ""  # usage rows POSTed here as CloudEvents batches (OpenMeter: .../api/v1/events); "": no export
    token: str = field(default="", metadata={"secret": True})  # sent as `Authorization: Bearer`
    token_file: str = ""
    batch_size: int = 500  # events per POST
    interval: float = 10.0  # seconds between rounds once every stored row went out
    timeout: float = 10.0  # seconds one POST may take
    max_backoff: float = 60.0  # the longest wait between retries of a batch that failed
    source: str = "sidecar"  # the events' `source`: one for every replica (a receiver drops repeats by source + id)
    type: str = "sidecar.request"  # the events' `type`


@dataclass(frozen=True)
class Settings:
    server: ServerCfg = ServerCfg()
    upstream: UpstreamCfg = UpstreamCfg()
    store: StoreCfg = StoreCfg()
    auth: AuthCfg = AuthCfg()
    limits: LimitsCfg = LimitsCfg()
    writer: WriterCfg = WriterCfg()
    audit: AuditCfg = AuditCfg()
    tracing: TracingCfg = TracingCfg()
    console: ConsoleCfg = ConsoleCfg()
    export: ExportCfg = ExportCfg()


SECTIONS: dict[str, type[Any]] = typing.get_type_hints(Settings)
