"""Config: the settings every component is built from, and nothing of ours below it. `sections` holds one frozen
dataclass per section of `sidecar.toml` with its defaults, `Settings` and `ConfigError`; `loading` reads TOML,
then `SIDECAR_<SECTION>_<OPTION>` environment variables, then CLI flags, and checks every value (one line naming
the option when it is bad); `credentials` reads secrets inline or from files and masks them for the log. Every
option has a documented line in `config/sidecar.toml`. The names the rest of the sidecar uses are re-exported
here: its face is this package.
"""

from sidecar.config.credentials import admin_token, mask_url, read_secret, summary
from sidecar.config.loading import (
    ENV_PREFIX,
    MAX_WORKERS,
    default_store_url,
    duration,
    jsonl_retention_seconds,
    load,
    retention_seconds,
)
from sidecar.config.sections import (
    SECTIONS,
    AuditCfg,
    AuthCfg,
    ConfigError,
    ConsoleCfg,
    ExportCfg,
    LimitsCfg,
    ServerCfg,
    Settings,
    StoreCfg,
    TracingCfg,
    UpstreamCfg,
    WriterCfg,
)

__all__ = [
    "ENV_PREFIX", "MAX_WORKERS", "SECTIONS", "AuditCfg", "AuthCfg", "ConfigError", "ConsoleCfg", "ExportCfg",
    "LimitsCfg", "ServerCfg", "Settings", "StoreCfg", "TracingCfg", "UpstreamCfg", "WriterCfg", "admin_token",
    "credentials", "default_store_url", "duration", "jsonl_retention_seconds", "load", "loading", "mask_url",
    "read_secret", "retention_seconds", "sections", "summary",
]  # fmt: skip
