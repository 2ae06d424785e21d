"""Key format and hashing: `sk-sc-<id>-<secret><check>`.

A recognisable prefix, a 12-character public id (the lookup key), a 32-character base62 secret (~190 bits) and a
6-character base62 CRC-32 of everything before it, so typos and secret scanners can tell a real key without a
lookup. Only HMAC-SHA256(pepper, secret) is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

PREFIX = "sk-sc-"


_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


ID_LEN, SECRET_LEN, CHECK_LEN = 12, 32, 6


KEY_LEN = len(PREFIX) + ID_LEN + 1 + SECRET_LEN + CHECK_LEN


_KEY_RE = re.compile(rf"sk-sc-([0-9a-z]{{{ID_LEN}}})-([0-9A-Za-z]{{{SECRET_LEN}}})([0-9A-Za-z]{{{CHECK_LEN}}})")


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
