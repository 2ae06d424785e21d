"""Cache salts: the `cache_salt` the sidecar writes into the bodies vLLM salts its prefix cache with
(`upstream.cache_salt = "key"`; README, "One engine, many tenants").

vLLM's prefix cache is shared by every request: a prompt whose prefix another request left in the cache starts
sooner, so a tenant can tell from its time to first token whether someone sent the same prefix (vLLM PR #17045,
CVE-2025-46570). A block's hash includes the request's salt, so requests with different salts never share a
block. The salt is HMAC-SHA256 under the pepper of the key's `cache_group` (or, with none, of its id), 43
base64url characters (256 bits, the length vLLM recommends): a tenant cannot guess another's, and it shows
neither the key nor its id. Keys of one group share one salt, so a team keeps its shared system prompt cached.
The scope is tagged (`group`/`key`), so a group named like another key's id never gets that key's salt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from sidecar.keys.auth import Principal

_MAX = 100_000  # salts kept: as many keys as the authenticator caches; past it the oldest is derived again
SALT_LEN = 43


def derive_salt(pepper: bytes, scope: str) -> str:
    digest = hmac.new(pepper, b"cache-salt\0" + scope.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode()[:SALT_LEN]


class CacheSalts:
    """Each key's salt, derived once and kept (a request then costs one dict lookup)."""

    def __init__(self, pepper: bytes) -> None:
        self._pepper = pepper
        self._salts: dict[str, str] = {}

    def salt(self, principal: Principal) -> str | None:
        """The salt of `principal`'s requests; None without a key (auth off): the sidecar cannot tell tenants
        apart there, so it writes none and a client's own salt goes through."""
        if principal.key_id is None:
            return None
        scope = f"group\0{principal.cache_group}" if principal.cache_group else f"key\0{principal.key_id}"
        found = self._salts.get(scope)
        if found is None:
            if len(self._salts) >= _MAX:
                del self._salts[next(iter(self._salts))]  # the oldest derived: insertion order
            found = self._salts[scope] = derive_salt(self._pepper, scope)
        return found
