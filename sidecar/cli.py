"""Command line: parse arguments, load settings, run the proxy or a subcommand."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from sidecar import __version__
from sidecar.config import ConfigError, Settings, load
from sidecar.logs import setup


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description="Reverse proxy for OpenAI-compatible servers.")
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _common(serve)
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--upstream", help="upstream OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    demo = sub.add_parser("demo-upstream", help="run a small fake OpenAI-compatible server")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    return parser


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
    if args.command == "serve":
        from sidecar.runner import run

        try:
            return run(settings)
        except ConfigError as exc:
            print(f"sidecar: configuration error: {exc}", file=sys.stderr)
            return 2
    return 2  # pragma: no cover - argparse enforces a known command
