"""The store-facing CLI commands: keys, requests, usage (and its export), audit, audit-log, migrate. Each opens
the store, acts, closes it. Only `migrate` (and `serve`) create a store; only `serve` creates a pepper: a command
pointed at the wrong place fails with one line instead of acting on an empty database or hashing with a pepper of
its own."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from sidecar.admin.params import parse_instant
from sidecar.admin.tables import csv_text, iso, text_table
from sidecar.audit.files import read_jsonl
from sidecar.config import Settings, mask_url
from sidecar.errors import SidecarError
from sidecar.keys.format import hash_secret, new_key
from sidecar.keys.pepper import check_pepper, load_pepper
from sidecar.keys.service import KeyAdmin, listing, validate
from sidecar.keys.static import StaticKeys
from sidecar.limits.budgets import budget_fields, from_store
from sidecar.records.export import event
from sidecar.store import open_store
from sidecar.store.base import REQUEST_COLUMNS, USAGE_FIELDS, KeyRow, RequestQuery, Store, StoreError

KEY_TABLE = (
    "id", "name", "status", "rpm", "tpm", "concurrency", "weight", "priority", "models", "expires_at", "created_at",
    "source",
)  # fmt: skip
REQUEST_TABLE = (
    "started_at", "request_id", "key_id", "key_name", "model", "status", "outcome", "prompt_tokens",
    "cached_tokens", "cache_write_tokens", "completion_tokens", "reasoning_tokens", "latency_ms",
)  # fmt: skip
PAGE = 500


class CommandError(Exception):
    """A command cannot do what was asked: one line on stderr, exit status 1."""


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
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        fields["models"] = None if models in ([], ["*"]) else models  # '*' (or nothing): every model
    if getattr(args, "expires_in", None):
        fields["expires_in"] = args.expires_in  # "never" clears an expiry
    for name in ("budget_tokens", "budget_period", "weight", "priority", "cache_group"):
        if getattr(args, name, None) is not None:
            fields[name] = getattr(args, name)
    if getattr(args, "no_budget", False):
        fields["budget_tokens"] = fields["budget_period"] = None
    if getattr(args, "audit", None):
        fields["audit"] = None if args.audit == "default" else args.audit
    return fields


def _print(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _emit(fmt: str, columns: tuple[str, ...], rows: list[dict[str, Any]], as_json: Any = None) -> None:
    if fmt == "json":
        _print(rows if as_json is None else as_json)
    elif fmt == "csv":
        sys.stdout.write(csv_text(columns, rows))
    else:
        sys.stdout.write(text_table(columns, rows))
        if not rows:
            sys.stdout.flush()
            print("(none)", file=sys.stderr)


async def run_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.command == "keys" and args.action == "create" and args.static:
            return await _static_key(args, settings)
        _check_text(args)
        creating = args.command == "keys" and args.action == "create"
        pepper = _pepper(settings) if creating else b""  # before the store: no pepper, no new empty store
        store = await _open(settings, create=args.command == "migrate")
        try:
            return await _dispatch(args, settings, store, pepper)
        finally:
            await store.close()
    except CommandError as err:
        print(f"sidecar: {err}", file=sys.stderr)
        return 1
    except SidecarError as err:
        print(f"sidecar: {err.message}", file=sys.stderr)
        return 1
    except StoreError as err:
        print(f"sidecar: store error: {err}", file=sys.stderr)
        return 1


# The arguments that become a key's fields or a store query (paths are not: their bytes are the file system's).
_TEXT_ARGS = ("id", "key", "name", "models", "model", "request_id")


def _check_text(args: argparse.Namespace) -> None:
    """Python keeps a command line's bytes that are not UTF-8 as lone surrogates, which no store, JSON encoder
    or log line takes: such a name or filter is refused in one line, not with a traceback."""
    for name in _TEXT_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raw = value.encode("utf-8", "surrogateescape")
                raise CommandError(f"{name}: {raw!r} is not UTF-8 text") from None


async def _open(settings: Settings, *, create: bool) -> Store:
    """The configured store, opened; an existing one is brought to the current schema. Only `migrate` may
    create one (and `serve`): a command pointed at a missing SQLite file or an empty database says so and
    stops, `keys create` too (a key in a store no server reads would answer 401)."""
    url = settings.store.url
    store = open_store(url, settings.store.pool_size, settings.store.op_timeout, settings.store.report_timeout)
    missing = f"no sidecar store at {mask_url(url)}: `sidecar serve` (or `sidecar migrate`) creates it; check --db, "
    missing += "--config, SIDECAR_STORE_URL or SIDECAR_SERVER_DATA_DIR"
    if url.startswith("sqlite:///") and not create and not os.path.exists(url[len("sqlite:///") :]):
        raise CommandError(missing)
    await store.open()
    ready = False
    try:
        if not create and await store.schema_version() == 0:
            raise CommandError(missing)
        await store.migrate()
        ready = True
    finally:
        if not ready:
            await store.close()
    return store


def _pepper(settings: Settings) -> bytes:
    return load_pepper(settings.auth.pepper, settings.auth.pepper_file, settings.server.data_dir)


async def _static_key(args: argparse.Namespace, settings: Settings) -> int:
    """A line for auth.static_keys_file. Hashed with the configured pepper (never a new one); checked against
    the store's fingerprint when there is a store to check against."""
    pepper = _pepper(settings)
    values = validate(_fields(args), creating=True)
    try:
        store = await _open(settings, create=False)
    except CommandError:
        print("# the pepper was not checked: there is no store here to compare it with", file=sys.stderr)
    else:
        try:
            await check_pepper(store, pepper)
        finally:
            await store.close()
    key, kid, secret = new_key()
    now = time.time()
    line = {"id": kid, "hash": hash_secret(pepper, secret), "created_at": now, "updated_at": now, **values}
    if line.get("models") is not None:
        line["models"] = list(line["models"])
    print(orjson.dumps(line).decode())
    print(f"# key (shown once): {key}", file=sys.stderr)
    return 0


async def _dispatch(args: argparse.Namespace, settings: Settings, store: Store, pepper: bytes) -> int:
    if args.command == "migrate":
        print(f"schema at version {await store.migrate()}")
    elif args.command == "audit-log":
        _print(await store.admin_events(args.limit))
    elif args.command == "usage":
        await _usage(args, settings, store)
    elif args.command == "requests":
        await _requests(args, settings, store)
    elif args.command == "audit":
        key_id = await _key_id(store, settings, args.key)
        await _audit_export(args, settings, store, key_id)
    else:
        await _keys(args, settings, store, pepper)
    return 0


async def _keys(args: argparse.Namespace, settings: Settings, store: Store, pepper: bytes) -> None:
    action = args.action
    if action == "create":
        await check_pepper(store, pepper)  # a key hashed with another pepper would answer 401 on the server
        created = await KeyAdmin(store, pepper).create(_fields(args), _actor())
        print(created.key)
        print(f"created key {created.row.id} ({created.row.name}); the key is shown only once", file=sys.stderr)
    elif action == "list":
        rows = listing(await store.list_keys(), StaticKeys(settings.auth.static_keys_file).rows())
        _emit(args.format, KEY_TABLE, [_key_view(r) for r in rows], rows)
    elif action == "show":
        row = await _find_key(store, settings, args.id)
        left = from_store(store.tokens_since, settings.limits.timezone)
        budget = await budget_fields(row.id, row.budget_tokens, row.budget_period, left)
        _print(_with_times({**row.public(), **budget}))
    else:
        row = await _find_key(store, settings, args.id)
        keys = KeyAdmin(store, b"")  # update and revoke hash nothing
        if action == "update":
            changed = await keys.update(row.id, _fields(args), _actor())
        else:
            changed = await keys.revoke(row.id, _actor())
        _print(_with_times(changed.public()))


async def _find_key(store: Store, settings: Settings, ref: str) -> KeyRow:
    """A key by id, or by name when no id matches (a name two keys share is refused, with their ids)."""
    row = await store.get_key(ref)
    if row is not None:
        return row
    static = StaticKeys(settings.auth.static_keys_file)
    if static.get(ref) is not None:
        raise CommandError(f"key {ref} comes from auth.static_keys_file: change its line there")
    named = [k for k in await store.list_keys() if k.name == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise CommandError(f"{len(named)} keys are named {ref!r} ({', '.join(k.id for k in named)}): give an id")
    raise CommandError(f"no key with id or name {ref!r}")


def _status(row: dict[str, Any], now: float) -> str:
    if row.get("revoked_at") is not None:
        return "revoked"
    expires = row.get("expires_at")
    return "expired" if expires is not None and expires <= now else "active"


def _key_view(row: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    limits = {name: "default" if row.get(name) is None else row[name] for name in ("rpm", "tpm", "concurrency")}
    return {
        **row,
        **limits,  # unset: the [limits] default applies, which is not "unlimited"
        "status": _status(row, now),
        "models": row.get("models") or "*",
        "weight": f"{1.0 if row.get('weight') is None else row['weight']:g}",  # 1, 2.5: as it was given
        "priority": row.get("priority") or "normal",
        "expires_at": iso(row.get("expires_at")) if row.get("expires_at") is not None else "never",
        "created_at": iso(row.get("created_at")),
    }


def _with_times(doc: dict[str, Any]) -> dict[str, Any]:
    """A key as JSON, epoch seconds kept (scripts) with an ISO twin for each (people)."""
    out = dict(doc)
    for name in ("created_at", "updated_at", "expires_at", "revoked_at", "budget_resets_at"):
        if name in doc:
            out[name.removesuffix("_at") + "_time"] = iso(doc[name]) if doc[name] is not None else None
    return out


def _window(args: argparse.Namespace) -> tuple[float, float | None]:
    now = time.time()
    since = parse_instant(args.since, "since", now)
    until = parse_instant(args.until, "until", now) if args.until else None
    if until is not None and until <= since:
        raise CommandError(f"--until ({iso(until)}) is not after --since ({iso(since)})")
    return since, until


async def _names(store: Store, settings: Settings) -> dict[str, str]:
    rows = [*await store.list_keys(), *StaticKeys(settings.auth.static_keys_file).rows()]
    return {k.id: k.name for k in rows}


async def _key_id(store: Store, settings: Settings, ref: str | None) -> str | None:
    return None if ref is None else (await _find_key(store, settings, ref)).id


async def _usage(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    since, until = _window(args)
    if args.action == "export":
        if args.format not in (None, "cloudevents"):
            raise CommandError(f"usage export writes --format cloudevents, not {args.format}")
        await _usage_events(settings, store, since, until)
        return
    if args.format == "cloudevents":
        raise CommandError("--format cloudevents is for `sidecar usage export`")
    args.format = args.format or "table"
    key_id = await _key_id(store, settings, args.key)
    rows = await store.usage(since, args.by, key_id, until, args.model)
    columns: tuple[str, ...] = (args.by, *USAGE_FIELDS)
    if args.by == "key":
        names = await _names(store, settings)
        rows = [{"key": r["key"], "name": names.get(r["key"] or ""), **r} for r in rows]
        columns = ("key", "name", *USAGE_FIELDS)
    if args.format == "table":
        print(f"usage from {iso(since)} until {iso(until) if until else 'now'}, by {args.by}", file=sys.stderr)
    _emit(args.format, columns, rows)


async def _usage_events(settings: Settings, store: Store, since: float, until: float | None) -> None:
    """The window's rows, oldest first, as the CloudEvents `[export]` sends (its source and type), one JSON
    object a line: streamed page by page from the report connection; stderr says how many."""
    after: tuple[float, str] | None = None
    count = 0
    while True:
        rows = await store.requests_after(since, until, after, PAGE)
        for row in rows:
            sys.stdout.write(orjson.dumps(event(row, settings.export.source, settings.export.type)).decode() + "\n")
        count += len(rows)
        if len(rows) < PAGE:
            break
        after = (rows[-1]["started_at"], rows[-1]["request_id"])
    print(f"# {count} usage events from {iso(since)} until {iso(until) if until else 'now'}", file=sys.stderr)


async def _requests(args: argparse.Namespace, settings: Settings, store: Store) -> None:
    since, until = _window(args)
    key_id = await _key_id(store, settings, args.key)
    query = RequestQuery(key_id, args.outcome, since, until, args.limit, None, args.request_id, args.model)
    rows = await store.requests(query)
    if args.format == "json":
        _print(rows)
        return
    names = await _names(store, settings)
    view = [{**r, "key_name": names.get(r["key_id"] or ""), "started_at": iso(r["started_at"])} for r in rows]
    _emit(args.format, REQUEST_TABLE if args.format == "table" else ("key_name", *REQUEST_COLUMNS), view)


async def _audit_export(args: argparse.Namespace, settings: Settings, store: Store, key_id: str | None) -> None:
    """Every sink that can be read back, the db sink's records first, then the jsonl sink's (each oldest
    first), every record once, streamed; stderr says how many came from where, and why nothing when nothing
    came back."""
    since, until = _window(args)
    readable = [s for s in settings.audit.sinks if s in ("db", "jsonl")]
    if not readable:
        raise CommandError(
            f"audit.sinks = {list(settings.audit.sinks)}: none can be read back (the stderr sink goes to the log); "
            "add jsonl or db"
        )
    seen: set[str] = set()  # request ids only: a record is written once even when both sinks hold it
    notes = []
    if "db" in readable:
        count = _write_new(await _db_audit(store, RequestQuery(key_id=key_id, since=since, until=until)), seen)
        notes.append(f"{count} from the db sink ({mask_url(settings.store.url)})")
    if "jsonl" in readable:
        directory = settings.audit.jsonl_dir or str(Path(settings.server.data_dir) / "audit")
        count = _write_new(read_jsonl(directory, since, until, key_id), seen)
        notes.append(f"{count} from the jsonl sink ({directory})")
    why = ""
    if not seen:
        why = f"; audit.capture is {settings.audit.capture!r}"
        why += " (per-key `audit = on` still captures)" if settings.audit.capture == "off" else ""
    print(f"# audit records since {iso(since)}: " + ", ".join(notes) + why, file=sys.stderr)


async def _db_audit(store: Store, query: RequestQuery) -> list[dict[str, Any]]:
    """The db sink's records, oldest first (the store pages newest first)."""
    records: list[dict[str, Any]] = []
    before: tuple[float, str] | None = None
    while True:
        page = await store.audit_records(dataclasses.replace(query, limit=PAGE, before=before))
        records.extend(page)
        if len(page) < PAGE:
            return records[::-1]
        before = (page[-1]["emitted_at"], page[-1]["request_id"])


def _write_new(records: Iterable[dict[str, Any]], seen: set[str]) -> int:
    written = 0
    for record in records:
        rid = str(record.get("request_id"))
        if rid not in seen:
            seen.add(rid)
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
            written += 1
    return written
