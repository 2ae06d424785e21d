"""Secrets in the settings: read inline or from a file (a mounted Kubernetes Secret), the admin token's minimum
length, and the settings as the startup log line shows them, with every secret and every credential in a URL
masked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.config.sections import ConfigError, ServerCfg, Settings

MIN_ADMIN_TOKEN = 16  # characters, as the pepper: a shorter one (a placeholder, `x`) is guessed


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
        return long_enough(name, read_secret(name, server.admin_token, server.admin_token_file))
    return long_enough("server.admin_token", server.admin_token) if server.admin_token else ""


def long_enough(name: str, token: str) -> str:
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
