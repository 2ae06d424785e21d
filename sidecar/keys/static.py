"""Static keys: keys an operator lists in a file (`auth.static_keys_file`), read again when the file changes."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson

from sidecar.store.base import KeyRow

log = logging.getLogger("sidecar.keys")


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
