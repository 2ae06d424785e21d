"""The pepper: the secret every stored key hash is keyed with, where it comes from, and the fingerprint the store
keeps so that a replica started with another pepper refuses to serve rather than refusing every key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from sidecar.config import ConfigError, read_secret
from sidecar.store.base import Store

MIN_PEPPER = 16  # characters; a generated pepper has 64 (32 random bytes, hex)

log = logging.getLogger("sidecar.keys")


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
    # Written beside, then linked into place: a command reading the pepper meanwhile never sees it empty, and of
    # two processes creating it at once the second fails (the link exists) rather than replacing the first's.
    part = stored.with_name(f"pepper.{os.getpid()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    try:
        os.link(part, stored)
    finally:
        part.unlink()
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
