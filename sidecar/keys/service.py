"""API keys: their format, hashing, the pepper, and the one admin service that creates and changes them.

Format: `sk-sc-<id>-<secret><check>`: a recognisable prefix, a 12-character public id (the lookup key), a
32-character base62 secret (~190 bits) and a 6-character base62 CRC-32 of everything before it, so typos and
secret scanners can tell a real key without a lookup. Only HMAC-SHA256(pepper, secret) is stored.

`KeyAdmin` is used by both the CLI and the admin API; every change goes to the store together with its
`admin_audit_log` row, in one transaction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sidecar.config import duration
from sidecar.errors import BadRequest, NotFound
from sidecar.keys.format import hash_secret, new_key, parse_key
from sidecar.keys.pepper import check_pepper
from sidecar.limits.periods import valid_period
from sidecar.store.base import AdminEvent, KeyRow, Store

log = logging.getLogger("sidecar.keys")

LIMIT_FIELDS = ("concurrency", "rpm", "tpm")
# Not in a name or a model: control characters (NUL is refused by PostgreSQL's text, ESC would reach the terminal of
# whoever lists the keys) and lone surrogates (bytes that were not UTF-8 in a command line: refused by every sink).
_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
EDITABLE = (
    "name", "concurrency", "rpm", "tpm", "models", "expires_at", "audit", "budget_tokens", "budget_period", "weight",
    "priority", "cache_group",
)  # fmt: skip
PRIORITIES = ("high", "normal", "low")  # the dispatch queue's classes (limits/queue.py), in the order they go
MAX_WEIGHT = 1000.0


def parse_duration(text: str, param: str = "expires_in") -> float:
    seconds = duration(text)
    if seconds is None:
        raise BadRequest(f"Invalid duration {text[:40]!r}: use e.g. 30d, 12h, 15m (at most a century).", param=param)
    return seconds


def listing(stored: list[KeyRow], static: list[KeyRow]) -> list[dict[str, Any]]:
    """Keys as the admin API and `keys list` show them: stored ones, then static ones (read-only there)."""
    return [{**k.public(), "source": "store"} for k in stored] + [{**k.public(), "source": "static"} for k in static]


@dataclass(frozen=True)
class Created:
    key: str  # shown once, never stored
    row: KeyRow


class KeyAdmin:
    """Create, update and revoke keys; each change writes its admin audit row in the same transaction."""

    def __init__(self, store: Store, pepper: bytes, rotate: bool = False) -> None:
        self.store = store
        self.pepper = pepper
        self.rotate = rotate  # auth.pepper_rotate: `serve` adopts a pepper that differs from the store's

    async def kept_key(self, path: Path, fields: dict[str, Any], actor: str) -> str:
        """The key kept in `path` (0600) while it is valid for another hour, else a new one kept there: the
        demo's key, so every start of the demo does not add another key."""
        with contextlib.suppress(OSError):
            key = path.read_text(encoding="utf-8").strip()
            parsed = parse_key(key)
            row = await self.store.get_key(parsed[0]) if parsed is not None else None
            mine = parsed is not None and row is not None and row.hash == hash_secret(self.pepper, parsed[1])
            valid = row is not None and row.revoked_at is None and (row.expires_at or math.inf) > time.time() + 3600
            if mine and valid:
                return key
        created = await self.create(fields, actor)
        # Written beside and renamed into place: whoever waits for the file (a script, the demo's reader) never
        # reads it empty or half written.
        part = path.with_name(f"{path.name}.{os.getpid()}.part")  # workers of one `--demo` may write it at once
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(created.key + "\n")
        os.replace(part, path)
        return created.key

    async def check_pepper(self) -> None:
        """The store's keys are hashed with this pepper (or it had none yet); PepperMismatch otherwise."""
        outcome = await check_pepper(self.store, self.pepper, adopt=self.rotate)
        if outcome == "recorded":
            log.info("the store keeps a fingerprint of this pepper now; a different one will be refused")

    async def create(self, fields: dict[str, Any], actor: str, request_id: str | None = None) -> Created:
        values = validate(fields, creating=True)
        key, kid, secret = new_key()
        now = time.time()
        row = KeyRow(
            id=kid,
            name=values.pop("name"),
            hash=hash_secret(self.pepper, secret),
            created_at=now,
            updated_at=now,
            **values,
        )
        await self.store.save_key(row, AdminEvent(actor, "key.create", kid, now, row.public(), request_id), create=True)
        return Created(key, row)

    async def update(self, key_id: str, fields: dict[str, Any], actor: str, request_id: str | None = None) -> KeyRow:
        values = validate(fields, creating=False)
        row = await self._get(key_id)
        now = time.time()
        changed = {k: v for k, v in values.items() if getattr(row, k) != v}
        new = replace(row, **values, updated_at=now)
        if (new.budget_tokens is None) != (new.budget_period is None):
            raise BadRequest("`budget_tokens` and `budget_period` are set together.", param="budget_period")
        event_changes = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changed.items()}
        await self.store.save_key(
            new, AdminEvent(actor, "key.update", key_id, now, event_changes, request_id), create=False
        )
        return new

    async def revoke(self, key_id: str, actor: str, request_id: str | None = None) -> KeyRow:
        row = await self._get(key_id)
        if row.revoked_at is not None:
            return row
        now = time.time()
        new = replace(row, revoked_at=now, updated_at=now)
        await self.store.save_key(
            new, AdminEvent(actor, "key.revoke", key_id, now, {"revoked_at": now}, request_id), create=False
        )
        return new

    async def _get(self, key_id: str) -> KeyRow:
        row = await self.store.get_key(key_id)
        if row is None:
            raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
        return row


def _budget_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "budget_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest("`budget_tokens` must be a non-negative integer or null.", param=name)
        return value
    if not isinstance(value, str) or not valid_period(value):
        raise BadRequest("`budget_period` must be day, week, month or a duration such as 10m.", param=name)
    return value


def _share_field(name: str, value: Any) -> Any:
    """`weight` (a number in (0, 1000]), `priority` (high, normal, low), `cache_group` (a name); null: default."""
    if value is None:
        return None
    if name == "weight":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WEIGHT:
            raise BadRequest(f"`weight` must be a number above 0 and at most {MAX_WEIGHT:g}, or null.", param=name)
        return float(value)
    if name == "priority":
        if value not in PRIORITIES:
            raise BadRequest("`priority` must be high, normal, low or null.", param=name)
        return value
    if not isinstance(value, str) or not 1 <= len(value) <= 200 or _NOT_TEXT.search(value):
        raise BadRequest("`cache_group` must be a name of 1-200 characters or null.", param=name)
    return value


def validate(fields: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """Check admin input; return the KeyRow fields to set. Unknown or ill-typed fields are 400s."""
    out: dict[str, Any] = {}
    allowed = (*EDITABLE, "expires_in")
    for name, value in fields.items():
        if name not in allowed:
            raise BadRequest(f"Unknown field {name!r}.", param=name, code="unknown_field")
        if name == "name":
            if not isinstance(value, str) or not 1 <= len(value) <= 200:
                raise BadRequest("`name` must be a string of 1-200 characters.", param="name")
            if _NOT_TEXT.search(value):
                raise BadRequest("`name` must not contain control characters.", param="name", code="invalid_value")
            out["name"] = value
        elif name in ("budget_tokens", "budget_period"):
            out[name] = _budget_field(name, value)
        elif name in ("weight", "priority", "cache_group"):
            out[name] = _share_field(name, value)
        elif name in LIMIT_FIELDS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise BadRequest(f"`{name}` must be a non-negative integer or null.", param=name)
            out[name] = value
        elif name == "models":
            if value is not None and (
                not isinstance(value, list | tuple)
                or not all(isinstance(m, str) and m and not _NOT_TEXT.search(m) for m in value)
            ):
                raise BadRequest("`models` must be a list of model names or null.", param="models")
            out["models"] = None if value is None or list(value) == ["*"] else tuple(value)  # ["*"]: all models
        elif name == "audit":
            if value not in (None, "on", "off"):
                raise BadRequest('`audit` must be "on", "off" or null.', param="audit")
            out["audit"] = value
        elif name == "expires_in":
            never = value is None or value == "never"  # clears an expiry
            out["expires_at"] = None if never else time.time() + parse_duration(str(value))
        elif name == "expires_at":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise BadRequest("`expires_at` must be epoch seconds or null.", param="expires_at")
            out["expires_at"] = value
    if creating and (out.get("budget_tokens") is None) != (out.get("budget_period") is None):
        raise BadRequest("`budget_tokens` and `budget_period` are set together.", param="budget_period")
    if creating and "name" not in out:
        raise BadRequest("`name` is required.", param="name")
    return out
