"""The store-facing CLI commands: keys, audit-log, migrate, usage. Each opens the store, acts, closes it."""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import sys
import time
from typing import Any

import orjson

from sidecar.config import Settings
from sidecar.errors import SidecarError
from sidecar.keys import KeyAdmin, StaticKeys, hash_secret, listing, load_pepper, new_key, parse_duration, validate
from sidecar.store import open_store
from sidecar.store.base import USAGE_FIELDS, RequestQuery, Store, StoreError


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("name", "rpm", "tpm", "concurrency"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "models", None) is not None:
        fields["models"] = [m.strip() for m in args.models.split(",") if m.strip()] or None
    if getattr(args, "expires_in", None):
        fields["expires_in"] = args.expires_in
    if getattr(args, "audit", None):
        fields["audit"] = None if args.audit == "default" else args.audit
    return fields


def _print(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


async def run_command(args: argparse.Namespace, settings: Settings) -> int:
    pepper = load_pepper(settings.auth.pepper, settings.auth.pepper_file, settings.server.data_dir)
    if args.command == "keys" and args.action == "create" and args.static:
        return _static_key(args, pepper)
    store = open_store(settings.store.url, settings.store.pool_size, settings.store.op_timeout)
    try:
        await store.open()
        await store.migrate()
        return await _dispatch(args, settings, store, KeyAdmin(store, pepper))
    except SidecarError as err:
        print(f"sidecar: {err.message}", file=sys.stderr)
        return 1
    except StoreError as err:
        print(f"sidecar: store error: {err}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _static_key(args: argparse.Namespace, pepper: bytes) -> int:
    values = validate(_fields(args), creating=True)
    key, kid, secret = new_key()
    now = time.time()
    line = {"id": kid, "hash": hash_secret(pepper, secret), "created_at": now, "updated_at": now, **values}
    if line.get("models") is not None:
        line["models"] = list(line["models"])
    print(orjson.dumps(line).decode())
    print(f"# key (shown once): {key}", file=sys.stderr)
    return 0


async def _dispatch(args: argparse.Namespace, settings: Settings, store: Store, keys: KeyAdmin) -> int:
    if args.command == "migrate":
        print(f"schema at version {await store.migrate()}")
        return 0
    if args.command == "audit-log":
        _print(await store.admin_events(args.limit))
        return 0
    if args.command == "usage":
        return await _usage(args, store)
    if args.command == "audit":
        return await _audit_export(args, store)
    action = args.action
    if action == "create":
        created = await keys.create(_fields(args), _actor())
        print(created.key)
        print(f"created key {created.row.id} ({created.row.name}); the key is shown only once", file=sys.stderr)
    elif action == "list":
        _print(listing(await store.list_keys(), StaticKeys(settings.auth.static_keys_file).rows()))
    elif action == "show":
        row = await store.get_key(args.id)
        if row is None:
            print(f"sidecar: no key with id {args.id!r}", file=sys.stderr)
            return 1
        _print(row.public())
    elif action == "update":
        _print((await keys.update(args.id, _fields(args), _actor())).public())
    elif action == "revoke":
        _print((await keys.revoke(args.id, _actor())).public())
    return 0


async def _usage(args: argparse.Namespace, store: Store) -> int:

    rows = await store.usage(time.time() - parse_duration(args.since), args.by)
    if args.format == "json":
        _print(rows)
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[args.by, *USAGE_FIELDS])
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
        sys.stdout.write(out.getvalue())
    else:
        cols = [args.by, *USAGE_FIELDS]
        table = [cols] + [[str(r[c]) for c in cols] for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        for row in table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs: a string starting with `=`, `+`, `-`, `@`, tab or CR (a
    formula, in Excel, LibreOffice and Google Sheets) gets a leading `'` (OWASP's advice for CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def _audit_export(args: argparse.Namespace, store: Store) -> int:

    since = time.time() - parse_duration(args.since)
    before: tuple[float, str] | None = None
    while True:
        page = await store.audit_records(RequestQuery(key_id=args.key_id, since=since, limit=500, before=before))
        for record in page:
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        if len(page) < 500:
            return 0
        before = (page[-1]["emitted_at"], page[-1]["request_id"])
