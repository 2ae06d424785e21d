"""API keys: their format, hashing, the pepper, and the one admin service that creates and changes them.

Format: `sk-sc-<id>-<secret><check>`: a recognisable prefix, a 12-character public id (the lookup key), a
32-character base62 secret (~190 bits) and a 6-character base62 CRC-32 of everything before it, so typos and
secret scanners can tell a real key without a lookup. Only HMAC-SHA256(pepper, secret) is stored.

`KeyAdmin` is used by both the CLI and the admin API; every change goes to the store together with its
`admin_audit_log` row, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from sidecar.budgets import valid_period
from sidecar.config import ConfigError, duration, read_secret
from sidecar.errors import BadRequest, NotFound
from sidecar.store.base import AdminEvent, KeyRow, Store

log = logging.getLogger("sidecar.keys")

PREFIX = "sk-sc-"
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
ID_LEN, SECRET_LEN, CHECK_LEN = 12, 32, 6
KEY_LEN = len(PREFIX) + ID_LEN + 1 + SECRET_LEN + CHECK_LEN
_KEY_RE = re.compile(rf"sk-sc-([0-9a-z]{{{ID_LEN}}})-([0-9A-Za-z]{{{SECRET_LEN}}})([0-9A-Za-z]{{{CHECK_LEN}}})")
LIMIT_FIELDS = ("concurrency", "rpm", "tpm")
EDITABLE = ("name", "concurrency", "rpm", "tpm", "models", "expires_at", "audit", "budget_tokens", "budget_period")


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def _check(body: str) -> str:
    return _b62(zlib.crc32(body.encode()), CHECK_LEN)


def new_key() -> tuple[str, str, str]:
    """A fresh key: (full key string, public id, secret)."""
    kid = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LEN))
    secret = "".join(secrets.choice(_B62) for _ in range(SECRET_LEN))
    return format_key(kid, secret), kid, secret


def format_key(kid: str, secret: str) -> str:
    body = f"{PREFIX}{kid}-{secret}"
    return body + _check(body)


def parse_key(key: str) -> tuple[str, str] | None:
    """(public id, secret) of a well-formed key with a valid checksum, else None."""
    if len(key) != KEY_LEN:
        return None
    m = _KEY_RE.fullmatch(key)
    if m is None or _check(key[:-CHECK_LEN]) != m.group(3):
        return None
    return m.group(1), m.group(2)


def hash_secret(pepper: bytes, secret: str) -> str:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()


MIN_PEPPER = 16  # characters; a generated pepper has 64 (32 random bytes, hex)


def load_pepper(inline: str, path: str, data_dir: str, *, create: bool = False) -> bytes:
    """The HMAC pepper: configured, from a secret file, or the one generated into the data directory. Only
    `serve` passes `create` and may generate it: a CLI command run from another directory must not hash keys
    with a pepper of its own, which the server would never accept.

    A pepper shorter than `MIN_PEPPER` characters (an empty file, a placeholder) is refused: with it, every
    key hash is an HMAC under a guessable key.
    """
    if path:
        return _checked(read_secret("auth.pepper_file", "", path), "auth.pepper_file")
    if inline:
        return _checked(inline, "auth.pepper")
    stored = Path(data_dir) / "pepper"
    if stored.exists():
        return _checked(stored.read_text(encoding="utf-8").strip(), f"the pepper in {stored}")
    if not create:
        raise ConfigError(
            f"auth.pepper: not set, and there is no pepper in {stored}; only `sidecar serve` generates one. "
            "Give the server's pepper (auth.pepper_file, SIDECAR_AUTH_PEPPER) or the server's --config / "
            "SIDECAR_SERVER_DATA_DIR"
        )
    stored.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32)
    fd = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    log.warning(
        "auth.pepper is not set: generated one into %s; replicas sharing a store need the same pepper "
        "(set auth.pepper_file)",
        stored,
    )
    return value.encode()


def _checked(pepper: str, name: str) -> bytes:
    if len(pepper) < MIN_PEPPER:
        raise ConfigError(
            f"{name}: the pepper is {len(pepper)} characters; at least {MIN_PEPPER} are required "
            "(e.g. `openssl rand -hex 32`)"
        )
    return pepper.encode()


PEPPER_SETTING = "pepper_fingerprint"
# PBKDF2-HMAC-SHA256 at OWASP's 600,000 rounds (~0.15 s, once at start): a weak pepper is not found from the
# fingerprint offline. Not scrypt: its 16 MiB stayed in the process after the start (glibc keeps the freed block).
_ROUNDS = 600_000


class PepperMismatch(ConfigError):
    """The pepper is not the one the store's keys were hashed with."""


def fingerprint(pepper: bytes, salt: bytes | None = None, rounds: int = _ROUNDS) -> str:
    """What the store keeps to recognise its pepper: a salted, slow digest, never the pepper. A stored one is
    checked with its own round count, so raising `_ROUNDS` later does not turn into a mismatch."""
    salt = secrets.token_bytes(16) if salt is None else salt
    if not 1 <= rounds <= 10 * _ROUNDS:  # a stored value that would take minutes is not ours
        raise ValueError(rounds)
    digest = hashlib.pbkdf2_hmac("sha256", pepper, salt, rounds, dklen=16)
    return f"pbkdf2-sha256${rounds}${salt.hex()}${digest.hex()}"


def fingerprint_matches(pepper: bytes, stored: str) -> bool:
    try:
        kind, rounds, salt, _ = stored.split("$")
        mine = fingerprint(pepper, bytes.fromhex(salt), int(rounds)) if kind == "pbkdf2-sha256" else ""
    except ValueError:
        return False
    return hmac.compare_digest(mine, stored)


async def check_pepper(store: Store, pepper: bytes, *, adopt: bool = False) -> str:
    """Compare the pepper with the store's fingerprint: "matched"; "recorded" when the store had none (a new
    store, or one from before fingerprints); "adopted" when `adopt` replaced a different one (a rotation).
    Otherwise PepperMismatch: every key in the store would answer 401."""
    stored = await store.get_setting(PEPPER_SETTING)
    if stored is None:
        await store.put_setting(PEPPER_SETTING, await asyncio.to_thread(fingerprint, pepper), replace=False)
        stored = await store.get_setting(PEPPER_SETTING)  # another replica may have recorded first
        if stored is not None and await asyncio.to_thread(fingerprint_matches, pepper, stored):
            return "recorded"
    elif await asyncio.to_thread(fingerprint_matches, pepper, stored):
        return "matched"
    if adopt:
        await store.put_setting(PEPPER_SETTING, await asyncio.to_thread(fingerprint, pepper), replace=True)
        log.warning("auth.pepper_rotate: the store now takes the new pepper; keys hashed with the old one fail")
        return "adopted"
    raise PepperMismatch(
        "auth.pepper: this is not the pepper the store's keys were hashed with (the store keeps a fingerprint "
        "of it); use the server's pepper (auth.pepper_file, SIDECAR_AUTH_PEPPER, or its data_dir). To rotate "
        "it on purpose (every stored key stops working), start `sidecar serve` once with auth.pepper_rotate = true"
    )


def parse_duration(text: str, param: str = "expires_in") -> float:
    seconds = duration(text)
    if seconds is None:
        raise BadRequest(f"Invalid duration {text[:40]!r}: use e.g. 30d, 12h, 15m (at most a century).", param=param)
    return seconds


def load_static_keys(path: str) -> dict[str, KeyRow]:
    """Hashed keys from a JSON-lines file (e.g. a mounted Kubernetes Secret), one KeyRow per line."""
    keys: dict[str, KeyRow] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            doc = orjson.loads(line)
            if not isinstance(doc, dict):
                raise TypeError("a line must be a JSON object")
            models = doc.pop("models", None)
            row = KeyRow(**{**doc, "models": tuple(models) if models is not None else None})
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a key line ({exc})") from None
        keys[row.id] = row
    return keys


def listing(stored: list[KeyRow], static: list[KeyRow]) -> list[dict[str, Any]]:
    """Keys as the admin API and `keys list` show them: stored ones, then static ones (read-only there)."""
    return [{**k.public(), "source": "store"} for k in stored] + [{**k.public(), "source": "static"} for k in static]


class StaticKeys:
    """The keys of `auth.static_keys_file`, reloaded when the file changes: a mounted Kubernetes Secret is
    updated in place (the kubelet swaps a symlink), so a key removed or revoked there stops working within
    `auth.cache_ttl` plus a second, without a restart. The file is checked at most once a second (one stat); a
    version that does not parse keeps the keys last loaded, and is reported once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = load_static_keys(path) if path else {}
        self._signature = self._stat()
        self._checked = time.monotonic()

    def get(self, kid: str) -> KeyRow | None:
        if not self.path:
            return None
        self.refresh()
        return self.keys.get(kid)

    def rows(self) -> list[KeyRow]:
        self.refresh()
        return sorted(self.keys.values(), key=lambda r: (r.created_at, r.id))

    def refresh(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < 1.0:
            return
        self._checked = now
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        try:
            self.keys = load_static_keys(self.path)
        except (OSError, ValueError) as exc:
            log.error(
                "auth.static_keys_file changed but cannot be read; keeping the keys loaded before",
                extra={"fields": {"error": str(exc)[:300]}},
            )
            return
        log.warning("auth.static_keys_file reloaded", extra={"fields": {"keys": len(self.keys)}})

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size


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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(created.key + "\n")
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
            out["name"] = value
        elif name in ("budget_tokens", "budget_period"):
            out[name] = _budget_field(name, value)
        elif name in LIMIT_FIELDS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise BadRequest(f"`{name}` must be a non-negative integer or null.", param=name)
            out[name] = value
        elif name == "models":
            if value is not None and (
                not isinstance(value, list | tuple) or not all(isinstance(m, str) and m for m in value)
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
