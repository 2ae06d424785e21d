"""Headers across the proxy, both ways, and who the client is.

Hop-by-hop headers, anything the `Connection` header names, and the client's credentials never cross. The
client's address is the peer's, or what a trusted proxy in front of us (`server.trusted_proxies`) says in
`X-Forwarded-For`; only then are its `X-Forwarded-Host/Proto/Port` passed on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


# Set by us from the peer's address (a client's own claims are kept only from a trusted proxy): vLLM's uvicorn
# believes these from 127.0.0.1, so an unchecked one would let any client choose the address vLLM logs.
_FORWARDING = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip"}
)


_TRUSTED_FORWARDING = ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-port")


def forwarded(headers: Mapping[str, str]) -> bool:
    """Whether a proxy passed this request on: it names the client it came from (`X-Forwarded-For`, `Forwarded`,
    `X-Real-IP`)."""
    return any(name in headers for name in ("x-forwarded-for", "forwarded", "x-real-ip"))


# Never forwarded to the upstream: the framing we rebuild, the client's credentials, cookies and our own id.
_REQUEST_DROP = (
    _FORWARDING
    | HOP_BY_HOP
    | {
        "host",
        "content-length",
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "expect",
        "accept-encoding",
        "x-request-id",
        "content-encoding",
    }
)


# Never relayed to the client: the framing our server rebuilds, the upstream's request id (ours replaces it),
# and cookies (a model server has none to give; one that did would hand them to every key holder).
# (`Date` and `Server` are the upstream's: kept, unless `server.server_header` names us.)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-request-id", "set-cookie"}


def clean_text(value: str, limit: int | None = None) -> str:
    """`value` (cut to `limit` characters) as text every sink takes: valid UTF-8, no NUL.

    aiohttp decodes a header's bytes as UTF-8 with `surrogateescape`, so a byte that is not UTF-8 (one `\\xff`
    in a `User-Agent`) becomes a lone surrogate, which orjson, the log line, the audit record and PostgreSQL all
    refuse. The bytes are recovered and decoded again with U+FFFD for each that is not UTF-8; NUL (which
    PostgreSQL's text refuses) becomes U+FFFD too. Text that is already clean costs one `isascii()`.
    """
    text = value if limit is None else value[:limit]
    if text.isascii() and "\x00" not in text:
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no undecodable byte makes (from a JSON escape, say)
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("connection")
    return {t.strip().lower() for t in value.split(",")} if value else set()


def filter_headers(
    pairs: Iterable[tuple[str, str]], drop: frozenset[str], named: AbstractSet[str] = frozenset()
) -> CIMultiDict[str]:
    """The headers minus `drop` and what `Connection` named (`named`), each name spelled as it came.

    A case-insensitive multidict: a header set later (ours) replaces every spelling of its name with its own,
    so one header results, and a name that repeats (two `Link` headers) keeps each of its lines.
    """
    return CIMultiDict(
        [(name, value) for name, value in pairs if (low := name.lower()) not in drop and low not in named]
    )


def to_client(incoming: CIMultiDict[str], request_id: str) -> CIMultiDict[str]:
    """The upstream's response headers as the client gets them (its spelling: the pool keeps the bytes' names)."""
    named = _connection_tokens(incoming)
    headers = filter_headers(incoming.items(), _RESPONSE_DROP, named)
    headers["x-request-id"] = request_id
    return headers


def _sent_as_spelled(raw: Iterable[tuple[bytes, bytes]], named: AbstractSet[str]) -> CIMultiDict[str]:
    """The client's headers minus `_REQUEST_DROP` and what `Connection` named, each name as the client spelled it:
    from the raw lines, since aiohttp's parsed headers spell a name it knows its own way (`content-type` becomes
    `Content-Type`). Decoded as aiohttp decodes them (which the pool undoes); a dropped line's value never is."""
    drop = _REQUEST_DROP
    return CIMultiDict(
        [
            (name, value.decode("utf-8", "surrogateescape"))
            for line, value in raw
            if (low := (name := line.decode("utf-8", "surrogateescape")).lower()) not in drop and low not in named
        ]
    )


class Forwarding:
    """Who the client is and what the upstream hears of it: the peer, or the last hop a trusted proxy in front of
    us added to `X-Forwarded-For` (`server.trusted_proxies`)."""

    def __init__(self, trusted_proxies: tuple[str, ...] = ()) -> None:
        self._trusted = tuple(ipaddress.ip_network(net, strict=False) for net in trusted_proxies)

    def to_upstream(
        self, incoming: Mapping[str, str], raw: Iterable[tuple[bytes, bytes]], request_id: str, peer: str | None
    ) -> CIMultiDict[str]:
        """The client's request headers as the upstream gets them (its own credentials are the upstream's to add):
        `raw` as it spelled them; `incoming`, the same parsed, is asked what they say."""
        named = _connection_tokens(incoming)
        headers = _sent_as_spelled(raw, named)
        headers["x-request-id"] = request_id
        if peer is not None:
            claimed = incoming.get("x-forwarded-for") if self._trusted and self._is_trusted(peer) else None
            headers["x-forwarded-for"] = f"{claimed}, {peer}" if claimed else peer
            if claimed is not None:
                for name in _TRUSTED_FORWARDING:
                    if (value := incoming.get(name)) is not None:
                        headers[name] = value
        headers["accept-encoding"] = "identity"  # the proxy reads usage out of the body it relays
        return headers

    def client_address(self, request: Any) -> str | None:
        """The client's address: the peer's, or the last hop a trusted proxy in front of us added to
        `X-Forwarded-For`."""
        peer: str | None = request.remote
        if peer is not None and self._trusted and self._is_trusted(peer):
            claimed = request.headers.get("x-forwarded-for")
            if claimed:  # the proxy's word, but the bytes are the client's: made text a log line can hold
                return clean_text(str(claimed).rsplit(",", 1)[-1].strip(), 256) or peer
        return peer

    def forwarded_https(self, request: Any) -> bool:
        """Whether the client reached us over TLS: here, or at a trusted proxy that says so."""
        if request.secure:
            return True
        peer = request.remote
        trusted = peer is not None and bool(self._trusted) and self._is_trusted(peer)
        return trusted and request.headers.get("x-forwarded-proto", "").strip().lower() == "https"

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)
