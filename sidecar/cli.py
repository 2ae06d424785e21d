"""Command line: parse arguments, load settings, run the proxy or a subcommand."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import ConfigError, Settings, load
from sidecar.ops.logs import setup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Reverse proxy for OpenAI-compatible servers.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _common(serve)
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--upstream", help="upstream OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument(
        "--demo", action="store_true", help="run the bundled demo upstream (to try the sidecar; default store only)"
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    _keys_parser(sub)
    _reports_parser(sub)

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema")
    _common(migrate)

    demo = sub.add_parser("demo-upstream", help="run a small fake OpenAI-compatible server")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    return parser


def _keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key; prints it once")
    _common(create)
    create.add_argument("--name", required=True)
    _key_fields(create)
    create.add_argument(
        "--static", action="store_true", help="do not store it: print a line for auth.static_keys_file instead"
    )
    listing = keys.add_parser("list", help="list keys (stored and static)")
    _common(listing)
    _format(listing)
    for name in ("show", "revoke"):
        p = keys.add_parser(name, help=f"{name} a key")
        _common(p)
        p.add_argument("id", help="the key's id, or its name")
    update = keys.add_parser("update", help="change a key's name, limits, models, expiry or audit setting")
    _common(update)
    update.add_argument("id", help="the key's id, or its name")
    update.add_argument("--name")
    _key_fields(update)


def _reports_parser(sub: Any) -> None:
    audit_log = sub.add_parser("audit-log", help="show the admin audit log")
    _common(audit_log)
    audit_log.add_argument("--limit", type=int, default=50)

    audit = sub.add_parser("audit", help="audit records").add_subparsers(dest="action", required=True)
    export = audit.add_parser("export", help="print audit records from the db and jsonl sinks as JSON lines")
    _common(export)
    _window(export)
    export.add_argument("--key", "--key-id", dest="key", help="one key's records (id or name)")

    usage = sub.add_parser("usage", help="usage report from the store; `usage export`: its rows as CloudEvents")
    usage.add_argument(
        "action", nargs="?", choices=("report", "export"), default="report",
        help="export: every row of the window as a CloudEvent, one JSON object a line (as [export] sends them)",
    )  # fmt: skip
    _common(usage)
    _window(usage)
    usage.add_argument("--by", choices=("key", "model", "day"), default="key")
    usage.add_argument("--key", help="one key (id or name)")
    usage.add_argument("--model", help="one model")
    usage.add_argument(
        "--format", choices=("table", "json", "csv", "cloudevents"), help="table (default); export: cloudevents"
    )

    requests = sub.add_parser("requests", help="list request rows, newest first (the admin API's filters)")
    _common(requests)
    _window(requests)
    requests.add_argument("--key", help="one key (id or name)")
    requests.add_argument("--model")
    requests.add_argument("--outcome", help="e.g. completed, rate_limited, client_disconnected, upstream_error")
    requests.add_argument("--request-id")
    requests.add_argument("--limit", type=int, default=100, help="at most this many rows (default 100)")
    _format(requests)


def _window(p: argparse.ArgumentParser) -> None:
    when = "a duration back from now (24h, 7d), a date (2026-11-01), an ISO time or epoch seconds"
    p.add_argument("--since", default="24h", help=f"from: {when} (default 24h)")
    p.add_argument("--until", help="until (not included), in the same forms; default now")


def _format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")


def _key_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, help="requests per minute (default: limits.rpm)")
    p.add_argument("--tpm", type=int, help="tokens per minute (default: limits.tpm)")
    p.add_argument("--concurrency", type=int, help="concurrent requests (default: limits.concurrency)")
    p.add_argument("--models", help="comma-separated allowed models; '*' for all (the default)")
    p.add_argument("--expires-in", help="e.g. 30d, 12h; 'never' clears an expiry")
    p.add_argument("--audit", choices=("on", "off", "default"), help="force audit capture for this key")
    p.add_argument("--budget-tokens", type=int, help="tokens per budget period (with --budget-period)")
    p.add_argument("--budget-period", help="day, week, month (in limits.timezone) or a duration such as 10m")
    p.add_argument("--no-budget", action="store_true", help="remove the key's budget")
    p.add_argument("--weight", type=float, help="its share of the upstream under contention (default 1)")
    p.add_argument("--priority", choices=("high", "normal", "low"), help="its class in the queue (default normal)")
    p.add_argument("--cache-group", help="keys of one group share a prefix-cache salt (upstream.cache_salt = key)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.environ.get("SIDECAR_CONFIG"), help="TOML config file")
    p.add_argument("--db", help="store URL: sqlite:///PATH or postgresql://... (store.url)")


def settings_from(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "server.log_level": getattr(args, "log_level", None),
        "upstream.url": getattr(args, "upstream", None),
        "store.url": getattr(args, "db", None),
    }
    return load(args.config, os.environ, flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo-upstream":
        from aiohttp import web

        from sidecar.demo_upstream import create_demo_app

        web.run_app(create_demo_app(), host=args.host, port=args.port, access_log=None)
        return 0
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    setup(settings.server.log_level)
    try:
        if args.command == "serve":
            from sidecar.runner import StartFailed, run

            try:
                return run(settings, args.demo)
            except StartFailed as exc:
                print(f"sidecar: {exc}", file=sys.stderr)
                return 1
        from sidecar.admin.commands import run_command

        return asyncio.run(run_command(args, settings))
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
