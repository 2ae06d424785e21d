"""Settings: frozen dataclasses loaded from TOML, then `SIDECAR_<SECTION>_<OPTION>` env, then CLI flags.

A leaf module: imports nothing of ours. Every option has a default here and a documented line in
`config/sidecar.toml`; a bad value raises `ConfigError` with one line naming the option and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

ENV_PREFIX = "SIDECAR_"
_DURATION = re.compile(r"^(\d{1,12})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = 100 * 366 * 86400  # a century: anything longer is a typo (and would overflow a timestamp)
MIN_ADMIN_TOKEN = 16  # characters, as the pepper: a shorter one (a placeholder, `x`) is guessed


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

_POSITIVE = {
    "server.workers",
    "server.max_body_bytes",
    "server.max_json_depth",
    "upstream.connect_timeout",
    "upstream.first_byte_timeout",
    "upstream.stream_idle_timeout",
    "upstream.keepalive_timeout",
    "upstream.health_timeout",
    "upstream.max_response_bytes",
    "upstream.pool_size",
    "store.pool_size",
    "store.retention_interval",
    "store.report_timeout",
    "store.report_max_days",
    "auth.cache_ttl",
    "auth.lookup_timeout",
    "limits.default_max_tokens",
    "limits.media_tokens",
    "limits.queue_size",
    "writer.max_rows",
    "writer.flush_interval_ms",
    "writer.queue_size",
    "writer.spool_max_bytes",
    "writer.spool_segment_bytes",
    "audit.queue_size",
    "audit.max_payload_bytes",
    "upstream.metrics_cache",
    "tracing.queue_size",
    "tracing.export_timeout",
    "tracing.export_delay",
    "console.session_ttl",
    "console.max_sessions",
    "console.session_max_age",
    "export.batch_size",
    "export.interval",
    "export.timeout",
    "export.max_backoff",
}


def load(
    path: str | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> Settings:
    """Build Settings from a TOML file, then env overrides, then flags `{"section.option": value}`."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if path:
        _merge_toml(raw, path)
    _merge_env(raw, os.environ if env is None else env)
    for dotted, value in (flags or {}).items():
        if value is not None:
            section, option = dotted.split(".", 1)
            raw[section][option] = value
    settings = Settings(**{name: _build(name, cls, raw[name]) for name, cls in SECTIONS.items()})
    if not settings.store.url:
        settings = dataclasses.replace(
            settings, store=dataclasses.replace(settings.store, url=default_store_url(settings.server.data_dir))
        )
    _check(settings)
    return settings


def default_store_url(data_dir: str) -> str:
    """The store when none is configured: `sidecar.db` in the data directory."""
    return f"sqlite:///{Path(data_dir) / 'sidecar.db'}"


def _merge_toml(raw: dict[str, dict[str, Any]], path: str) -> None:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    for section, options in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section in {path}")
        if not isinstance(options, dict):
            raise ConfigError(f"{section}: must be a table")
        raw[section].update(options)


def _merge_env(raw: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, option = name[len(ENV_PREFIX) :].lower().partition("_")
        # Names whose section is not ours (e.g. Kubernetes' SIDECAR_PORT service links) are not ours.
        if section in SECTIONS and option:
            raw[section][option] = value


def _build(section: str, cls: type[Any], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for option, value in values.items():
        if option not in known:
            raise ConfigError(f"{section}.{option}: unknown option")
        kwargs[option] = _coerce(f"{section}.{option}", hints[option], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is Literal:  # a choice, declared on the field
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
        return value
    if hint is bool:
        return _to_bool(name, value)
    if hint is int or hint is float:
        return _to_number(name, hint, value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple or isinstance(hint, types.GenericAlias):
        items = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(items)
    raise ConfigError(f"{name}: unsupported option type")  # pragma: no cover - a bug in this module


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _to_number(name: str, hint: type[Any], value: Any) -> int | float:
    kind = "an integer" if hint is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{name}: expected {kind}, got {value!r}")
    try:
        number = hint(value) if not isinstance(value, float) or hint is float else _exact_int(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None
    if math.isnan(number) or math.isinf(number):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if number < 0:
        raise ConfigError(f"{name}: must not be negative, got {value!r}")
    if name in _POSITIVE and number == 0:
        raise ConfigError(f"{name}: must be greater than 0")
    return typing.cast(int | float, number)


def _exact_int(value: float) -> int:
    if not value.is_integer():
        raise ValueError
    return int(value)


def _check(s: Settings) -> None:
    if not 1 <= s.server.port <= 65535 and s.server.port != 0:
        raise ConfigError(f"server.port: must be 1-65535, got {s.server.port}")
    if s.server.ops_port > 65535:
        raise ConfigError(f"server.ops_port: must be 1-65535 (or 0: off), got {s.server.ops_port}")
    if s.server.admin_token and not s.server.admin_token_file:  # a file is read (and checked) at start
        _long_enough("server.admin_token", s.server.admin_token)
    if s.server.ops_port and s.server.ops_port == s.server.port:
        raise ConfigError(f"server.ops_port: must differ from server.port ({s.server.port}); 0 turns it off")
    _check_workers(s.server)
    for net in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: {net!r} is not an address or network (CIDR)") from None
    url = s.upstream.url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream.url: must start with http:// or https://, got {mask_url(url)!r}")
    if not s.upstream.health_path.startswith("/"):
        raise ConfigError("upstream.health_path: must start with /")
    for path in s.upstream.extra_paths:
        if not path.startswith("/v1/") or any(part in ("", ".", "..") for part in path[1:].split("/")):
            raise ConfigError(f"upstream.extra_paths: {path!r} is not a canonical /v1/ path")
    if not s.store.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("store.url: must be sqlite:///PATH or postgresql://...")
    if s.store.retention not in ("", "0") and duration(s.store.retention) is None:
        raise ConfigError(f"store.retention: expected a duration such as 90d or 0 (keep), got {s.store.retention!r}")
    if s.audit.jsonl_retention not in ("", "0") and duration(s.audit.jsonl_retention) is None:
        shown = s.audit.jsonl_retention
        raise ConfigError(f"audit.jsonl_retention: expected a duration such as 30d or 0 (keep), got {shown!r}")
    if not 0.0 <= s.audit.sample_rate <= 1.0:
        raise ConfigError(f"audit.sample_rate: must be between 0 and 1, got {s.audit.sample_rate}")
    _check_saturation(s.limits)
    _check_export(s.export)
    if s.limits.store_down not in ("local", "reject"):
        raise ConfigError(f"limits.store_down: must be local or reject, got {s.limits.store_down!r}")
    try:
        ZoneInfo(s.limits.timezone)
    except (ValueError, ZoneInfoNotFoundError):
        raise ConfigError(
            f"limits.timezone: unknown time zone {s.limits.timezone!r} (e.g. UTC, Europe/Berlin)"
        ) from None
    for sink in s.audit.sinks:
        if sink not in ("stderr", "jsonl", "db"):
            raise ConfigError(f"audit.sinks: unknown sink {sink!r} (stderr, jsonl, db)")
    if not s.upstream.metrics_path.startswith("/"):
        raise ConfigError("upstream.metrics_path: must start with /")
    if not 0.0 <= s.tracing.sample_ratio <= 1.0:
        raise ConfigError(f"tracing.sample_ratio: must be between 0 and 1, got {s.tracing.sample_ratio}")
    if s.tracing.protocol not in ("", "http/protobuf", "grpc"):
        raise ConfigError(f"tracing.protocol: must be http/protobuf or grpc, got {s.tracing.protocol!r}")
    if s.tracing.endpoint and not s.tracing.endpoint.startswith(("http://", "https://")):
        shown = mask_url(s.tracing.endpoint)
        raise ConfigError(f"tracing.endpoint: must start with http:// or https://, got {shown!r}")
    if s.console.oidc_issuer:
        _check_oidc(s.console)


def _check_oidc(c: ConsoleCfg) -> None:
    """OIDC sign-in: an https issuer (plain http only on loopback, for a provider on this host), a client, its
    secret's file, a role rule or two, and `openid` among the scopes."""
    parts = urlsplit(c.oidc_issuer)
    loopback = parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
    if not (parts.scheme == "https" or loopback) or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"console.oidc_issuer: must be an https:// URL, got {mask_url(c.oidc_issuer)!r}")
    for name in ("oidc_client_id", "oidc_client_secret_file", "oidc_operator_claim"):
        if not getattr(c, name):
            raise ConfigError(f"console.{name}: required with console.oidc_issuer")
    for name in ("oidc_operator_claim", "oidc_viewer_claim"):
        claim, eq, value = getattr(c, name).partition("=")
        if getattr(c, name) and not (eq and claim.strip() and value.strip()):
            raise ConfigError(f"console.{name}: expected CLAIM=VALUE (e.g. groups=platform), got {getattr(c, name)!r}")
    if "openid" not in c.oidc_scopes:
        raise ConfigError("console.oidc_scopes: must include openid")


def _check_export(export: ExportCfg) -> None:
    if export.url and not export.url.startswith(("http://", "https://")):
        raise ConfigError(f"export.url: must start with http:// or https://, got {mask_url(export.url)!r}")
    if export.batch_size > 10_000:
        raise ConfigError(f"export.batch_size: at most 10000 events a POST, got {export.batch_size}")
    for name in ("source", "type"):
        if not getattr(export, name).strip():
            raise ConfigError(f"export.{name}: must not be empty (a CloudEvent requires it)")


MAX_WORKERS = 64


def _check_workers(server: ServerCfg) -> None:
    """Workers share `port` (SO_REUSEPORT: port 0 would give each its own) and each has its own operations port,
    `ops_port + i`; worker 0's shows and drains them all (README, "Workers")."""
    n = server.workers
    if n > MAX_WORKERS:
        raise ConfigError(f"server.workers: at most {MAX_WORKERS}, got {n}")
    if n == 1:
        return
    if server.port == 0:
        raise ConfigError("server.workers: more than 1 needs a fixed server.port (0 would give each worker its own)")
    last = server.ops_port + n - 1
    if server.ops_port and last > 65535:
        raise ConfigError(f"server.ops_port: worker i listens on ops_port + i; {last} is past 65535")
    if server.ops_port and server.ops_port <= server.port <= last:
        raise ConfigError(f"server.ops_port: workers take ops ports {server.ops_port}-{last}, which hold server.port")


def _check_saturation(limits: LimitsCfg) -> None:
    if limits.saturation == "metrics" and not limits.global_concurrency:
        raise ConfigError(
            "limits.saturation: metrics needs limits.global_concurrency > 0 (the most it may dispatch at once)"
        )
    if not 0.0 < limits.saturation_interval <= 0.25:
        raise ConfigError(
            f"limits.saturation_interval: must be above 0 and at most 0.25, got {limits.saturation_interval}"
        )
    if not 0.0 < limits.saturation_kv <= 1.0:
        raise ConfigError(f"limits.saturation_kv: must be above 0 and at most 1, got {limits.saturation_kv}")
    if not 0.0 <= limits.budget_metrics_refresh <= 3600.0:
        raise ConfigError(
            f"limits.budget_metrics_refresh: must be between 0 and 3600 seconds, got {limits.budget_metrics_refresh}"
        )


def duration(text: str) -> float | None:
    """Seconds in `30d`, `12h`, `15m`, `45s`, `2w`; None when it is not such a duration or over a century."""
    m = _DURATION.match(text.strip())
    if m is None:
        return None
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    return float(seconds) if seconds <= MAX_DURATION else None


def retention_seconds(store: StoreCfg) -> float:
    """How long request and audit rows are kept; 0 keeps them forever."""
    return 0.0 if store.retention in ("", "0") else duration(store.retention) or 0.0


def jsonl_retention_seconds(audit: AuditCfg) -> float:
    """How long the jsonl audit sink keeps a segment after its last write; 0 keeps them forever."""
    return 0.0 if audit.jsonl_retention in ("", "0") else duration(audit.jsonl_retention) or 0.0


def read_secret(name: str, value: str, path: str) -> str:
    """A secret given inline or in a file (a mounted Kubernetes Secret); the file wins when both are set."""
    if not path:
        return value
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None


def admin_token(server: ServerCfg) -> str:
    """The admin token, inline or from its file (the file wins); "" (none configured) turns the admin API off."""
    if server.admin_token_file:
        name = "server.admin_token_file"
        return _long_enough(name, read_secret(name, server.admin_token, server.admin_token_file))
    return _long_enough("server.admin_token", server.admin_token) if server.admin_token else ""


def _long_enough(name: str, token: str) -> str:
    if len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(
            f"{name}: the admin token has {len(token)} characters; at least {MIN_ADMIN_TOKEN} are required "
            "(e.g. `openssl rand -hex 24`)"
        )
    return token


def summary(settings: Settings) -> dict[str, dict[str, Any]]:
    """Settings as plain data with every secret masked, for the startup log line."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(settings):
        cfg = getattr(settings, section.name)
        out[section.name] = {
            f.name: ("***" if f.metadata.get("secret") and getattr(cfg, f.name) else getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
        }
    out["store"]["url"] = mask_url(settings.store.url)
    out["upstream"]["url"] = mask_url(settings.upstream.url)
    out["tracing"]["endpoint"] = mask_url(settings.tracing.endpoint)
    out["export"]["url"] = mask_url(settings.export.url)
    return out


_SECRET_PARAMS = frozenset(
    {
        "password", "passwd", "pwd", "pass", "sslpassword", "secret", "client_secret", "token", "access_token",
        "refresh_token", "api_key", "api-key", "apikey", "key", "sig", "signature", "auth", "credential",
    }
)  # fmt: skip


def mask_url(url: str) -> str:
    """A URL with every credential in it replaced by `***` (the userinfo password, an HTTP URL's user name, and
    query parameters such as `password=`, `sslpassword=`, `token=`, `sig=`), fit for logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "***"  # not a URL we can take apart: say nothing of it
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if password is not None:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    elif at and parts.scheme in ("http", "https"):
        netloc = f"***@{host}"  # a user name alone in an HTTP URL is a token (`https://TOKEN@host`)
    query = "&".join(_mask_param(p) for p in parts.query.split("&")) if parts.query else ""
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _mask_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}=***" if eq and name.lower() in _SECRET_PARAMS else param
