"""OpenID Connect sign-in for console operators (`[console] oidc_issuer`): the authorization code flow with PKCE
(S256) against the provider's discovery document, as a confidential client (its secret from a file).

`begin` keeps a sign-in's state, nonce and PKCE verifier here (at most MAX_PENDING, each for PENDING_TTL
seconds, on the port it began on) and sends the browser to the provider; `finish` takes them back by the state
the provider returns (once), exchanges the code at the token endpoint and checks the ID token: its signature by
a key of the provider's JWKS (fetched from discovery, cached, fetched again on an unknown `kid`), issuer,
audience (and `azp` when there are several), `exp`/`iat` within LEEWAY seconds, and the nonce. Claims the ID
token lacks (many providers put groups in the userinfo answer only) are asked of the userinfo endpoint, for the
same subject. A role rule `CLAIM=VALUE` (the claim a string equal to VALUE or a list holding it; a dotted CLAIM
walks into objects, e.g. `realm_access.roles=admin`) makes an operator or a read-only one; anyone else is refused.

The JOSE work is PyJWT's (the `oidc` extra), imported only when OIDC is configured: no hand-made crypto here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus, urlencode, urlsplit

import aiohttp

from sidecar.config import ConfigError, ConsoleCfg
from sidecar.errors import BadRequest, Forbidden, Unauthorized, UpstreamError

if TYPE_CHECKING:
    import jwt

MAX_PENDING = 1000  # sign-ins begun and not finished; past that the oldest is forgotten
PENDING_TTL = 600.0  # seconds a person has at the provider's sign-in page
LEEWAY = 60  # seconds of clock difference allowed on exp/iat
DISCOVERY_TTL = 3600.0  # the discovery document and the JWKS are read again after this
JWKS_REFETCH = 10.0  # an unknown kid fetches the JWKS again, at most this often
HTTP_TIMEOUT = 10.0
MAX_DOCUMENT = 1 << 20  # bytes of a provider's answer read at most
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)  # never `none`, never an HMAC with the client secret
MAX_NAME = 200  # characters of a subject or an email kept for the audit log


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who signed in, and as what."""

    subject: str
    email: str
    read_only: bool

    @property
    def actor(self) -> str:
        """How the admin audit log names them."""
        return f"oidc:{self.subject} {self.email}".rstrip()


@dataclass(frozen=True, slots=True)
class Begun:
    nonce: str
    verifier: str
    redirect_uri: str
    port: int
    born: float


class Oidc:
    def __init__(self, cfg: ConsoleCfg) -> None:
        require_jose()
        self.cfg = cfg
        self.issuer = cfg.oidc_issuer.rstrip("/")
        self.host = urlsplit(cfg.oidc_issuer).hostname or cfg.oidc_issuer
        self.secret = _read_secret(cfg.oidc_client_secret_file)
        self.operator = _rule(cfg.oidc_operator_claim)
        self.viewer = _rule(cfg.oidc_viewer_claim)
        self._pending: OrderedDict[str, Begun] = OrderedDict()
        self._meta: dict[str, Any] | None = None
        self._meta_at = 0.0
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_at = 0.0

    # --- the flow ------------------------------------------------------------------------------------------

    async def begin(self, redirect_uri: str, port: int) -> str:
        """The provider's authorization URL for a new sign-in, whose secrets are kept here."""
        meta = await self.discovery()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        self._forget_stale(time.monotonic())
        while len(self._pending) >= MAX_PENDING:
            self._pending.popitem(last=False)
        self._pending[state] = Begun(nonce, verifier, redirect_uri, port, time.monotonic())
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        query = urlencode({
            "response_type": "code", "client_id": self.cfg.oidc_client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self.cfg.oidc_scopes), "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        })  # fmt: skip
        endpoint = str(meta["authorization_endpoint"])
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    async def finish(self, state: str, code: str, port: int) -> SignedIn:
        """The sign-in `state` names, completed with the provider's `code`: who it is and as what."""
        begun = self._take(state, port)
        if not code:
            raise BadRequest("The provider sent no code.", code="oidc_no_code")
        meta = await self.discovery()
        tokens = await self._exchange(meta, code, begun)
        claims = await self.validate(tokens["id_token"], begun.nonce)
        wanted = [rule[0] for rule in (self.operator, self.viewer) if rule is not None]
        if any(_claim(claims, name) is None for name in wanted) and tokens.get("access_token"):
            claims = await self._with_userinfo(meta, str(tokens["access_token"]), claims)
        return self.role(claims)

    def _take(self, state: str, port: int) -> Begun:
        """A state is good once, on the port its sign-in began on, for PENDING_TTL seconds."""
        now = time.monotonic()
        self._forget_stale(now)
        begun = self._pending.pop(state, None) if state else None
        if begun is None or begun.port != port:
            raise BadRequest("Unknown or expired sign-in; start again.", code="oidc_state")
        return begun

    def _forget_stale(self, now: float) -> None:
        while self._pending and now - next(iter(self._pending.values())).born > PENDING_TTL:
            self._pending.popitem(last=False)

    def role(self, claims: dict[str, Any]) -> SignedIn:
        subject, email = str(claims["sub"])[:MAX_NAME], claims.get("email")
        email = email[:MAX_NAME] if isinstance(email, str) else ""
        if _matches(claims, self.operator):
            return SignedIn(subject, email, read_only=False)
        if _matches(claims, self.viewer):
            return SignedIn(subject, email, read_only=True)
        raise Forbidden("Your account is not an operator of this console.", code="oidc_no_role")

    # --- the ID token --------------------------------------------------------------------------------------

    async def validate(self, id_token: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, times and nonce hold; 401 otherwise."""
        import jwt

        meta = await self.discovery()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise Unauthorized("The ID token is not a JWT.", code="oidc_id_token") from None
        algorithms = [a for a in meta.get("id_token_signing_alg_values_supported", ["RS256"]) if a in ASYMMETRIC]
        if header.get("alg") not in algorithms:
            raise Unauthorized("The ID token's algorithm is not accepted.", code="oidc_id_token")
        key = await self._key(header.get("kid"))
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token, key, algorithms=[str(header["alg"])], audience=self.cfg.oidc_client_id,
                issuer=str(meta["issuer"]), leeway=LEEWAY,
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
            )  # fmt: skip
        except jwt.PyJWTError as exc:  # the reason (expired, bad signature, wrong audience) without the token
            raise Unauthorized(f"The ID token was refused: {exc}.", code="oidc_id_token") from None
        if claims.get("iat", 0) > time.time() + LEEWAY:
            raise Unauthorized("The ID token was issued in the future.", code="oidc_id_token")
        if isinstance(claims["aud"], list) and len(claims["aud"]) > 1 and claims.get("azp") != self.cfg.oidc_client_id:
            raise Unauthorized("The ID token is for another party (azp).", code="oidc_id_token")
        sent = claims.get("nonce")
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), nonce.encode()):
            raise Unauthorized("The ID token's nonce is not this sign-in's.", code="oidc_id_token")
        return claims

    async def _key(self, kid: Any) -> jwt.PyJWK:
        """The JWKS key named `kid` (with no `kid`: the only signing key); an unknown one fetches the JWKS again,
        at most every JWKS_REFETCH seconds (a provider that rotated its keys; never a fetch per forged token)."""
        now = time.monotonic()
        if self._jwks is None or now - self._jwks_at > DISCOVERY_TTL:
            await self._fetch_jwks()
        found = self._find(kid)
        if found is None and now - self._jwks_at >= JWKS_REFETCH:
            await self._fetch_jwks()
            found = self._find(kid)
        if found is None:
            raise Unauthorized("The ID token is signed by a key the provider does not publish.", code="oidc_id_token")
        return found

    def _find(self, kid: Any) -> jwt.PyJWK | None:
        keys = [k for k in (self._jwks.keys if self._jwks is not None else []) if k.public_key_use in (None, "sig")]
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((k for k in keys if k.key_id == kid), None)

    async def _fetch_jwks(self) -> None:
        import jwt

        doc = await self._get(str((await self.discovery())["jwks_uri"]))
        try:
            self._jwks = jwt.PyJWKSet.from_dict(doc)
        except jwt.PyJWTError:
            raise UpstreamError("The provider's JWKS holds no usable key.", code="oidc_provider") from None
        self._jwks_at = time.monotonic()

    # --- the provider --------------------------------------------------------------------------------------

    async def discovery(self) -> dict[str, Any]:
        """The provider's discovery document, read at first need (the sidecar starts while the provider is down)
        and again after DISCOVERY_TTL; its issuer must be the one configured."""
        if self._meta is not None and time.monotonic() - self._meta_at < DISCOVERY_TTL:
            return self._meta
        meta = await self._get(f"{self.issuer}/.well-known/openid-configuration")
        needed = ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri")
        if any(not isinstance(meta.get(name), str) for name in needed):
            raise UpstreamError("The provider's discovery document is incomplete.", code="oidc_provider")
        if meta["issuer"].rstrip("/") != self.issuer:
            raise UpstreamError("The provider's discovery document names another issuer.", code="oidc_provider")
        self._meta, self._meta_at = meta, time.monotonic()
        return meta

    async def _exchange(self, meta: dict[str, Any], code: str, begun: Begun) -> dict[str, Any]:
        """The code for tokens at the token endpoint: the client authenticated by its secret (HTTP Basic, or in
        the form where the provider takes only that), the PKCE verifier proving this is who began it."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": begun.redirect_uri}
        form["code_verifier"] = begun.verifier
        methods = meta.get("token_endpoint_auth_methods_supported", ["client_secret_basic"])
        headers = {}
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            # RFC 6749 2.3.1: each part form-encoded before Basic joins them
            headers["authorization"] = aiohttp.encode_basic_auth(_form(self.cfg.oidc_client_id), _form(self.secret))
        else:
            form |= {"client_id": self.cfg.oidc_client_id, "client_secret": self.secret}
        doc = await self._call("POST", str(meta["token_endpoint"]), data=form, headers=headers, refused_ok=True)
        if not isinstance(doc.get("id_token"), str):
            error = doc.get("error") if isinstance(doc.get("error"), str) else "no id_token"
            raise Unauthorized(f"The provider did not give tokens for this code ({error}).", code="oidc_code")
        return doc

    async def _with_userinfo(self, meta: dict[str, Any], access: str, claims: dict[str, Any]) -> dict[str, Any]:
        """Claims from the userinfo endpoint where the ID token lacks them: for the same subject only."""
        endpoint = meta.get("userinfo_endpoint")
        if not isinstance(endpoint, str):
            return claims
        info = await self._call("GET", endpoint, headers={"authorization": f"Bearer {access}"})
        if info.get("sub") != claims["sub"]:
            raise Unauthorized("The provider's userinfo is for another subject.", code="oidc_userinfo")
        return {**info, **claims}

    async def _get(self, url: str) -> dict[str, Any]:
        return await self._call("GET", url)

    async def _call(self, method: str, url: str, refused_ok: bool = False, **kwargs: Any) -> dict[str, Any]:
        """A JSON object from the provider; unreachable, too large or not JSON is a 502 (`refused_ok`: a 4xx's
        body is the answer, as the token endpoint's errors are)."""
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.request(method, url, **kwargs) as r:
                body = await r.content.read(MAX_DOCUMENT + 1)
                status = r.status
        except (aiohttp.ClientError, TimeoutError):
            raise UpstreamError("The OpenID provider is unreachable.", code="oidc_provider") from None
        ok = status < 300 or (refused_ok and 400 <= status < 500)
        try:
            doc = json.loads(body) if ok and len(body) <= MAX_DOCUMENT else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise UpstreamError(f"The OpenID provider answered {status} without a JSON object.", code="oidc_provider")
        return doc


def require_jose() -> None:
    """One clear start-up error when OIDC is configured and PyJWT (the `oidc` extra) is not installed."""
    try:
        import jwt  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: F401
    except ImportError:
        raise ConfigError(
            "console.oidc_issuer is set but PyJWT with cryptography is not installed: pip install 'sidecar[oidc]'"
        ) from None


def _read_secret(path: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"console.oidc_client_secret_file: cannot read {path}: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(f"console.oidc_client_secret_file: {path} is empty")
    return secret


def _rule(text: str) -> tuple[str, str] | None:
    claim, _, value = text.partition("=")
    return (claim.strip(), value.strip()) if text else None


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name; a dotted name walks into objects (`realm_access.roles`) unless the whole name is a claim."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _matches(claims: dict[str, Any], rule: tuple[str, str] | None) -> bool:
    if rule is None:
        return False
    value = _claim(claims, rule[0])
    if isinstance(value, list):
        return rule[1] in [str(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)]
    return isinstance(value, str) and value == rule[1]


def _form(text: str) -> str:
    return quote_plus(text)
