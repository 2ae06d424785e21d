"""Loading the settings: TOML, then `SIDECAR_<SECTION>_<OPTION>` environment variables, then CLI flags, each
value coerced to its option's type and every section checked; a bad value is one `ConfigError` line naming the
option and the reason. Durations (`30d`, `12h`) are read here too."""

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
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.config.credentials import long_enough, mask_url
from sidecar.config.sections import (
    SECTIONS,
    AuditCfg,
    ConfigError,
    ConsoleCfg,
    ExportCfg,
    LimitsCfg,
    ServerCfg,
    Settings,
    StoreCfg,
)

ENV_PREFIX = "SIDECAR_"
_DURATION = re.compile(r"^(\d{1,12})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = 100 * 366 * 86400  # a century: anything longer is a typo (and would overflow a timestamp)


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
        long_enough("server.admin_token", s.server.admin_token)
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
