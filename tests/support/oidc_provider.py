"""A real OpenID provider for the console's OIDC tests: npm's `oidc-provider` run by node (tests/support/oidc/,
installed by `scripts/dev.sh install` with `npm ci` from its lock file), one per test session.

Its signing key is made here and handed to it in a JWKS file, so a test can also sign tokens with the provider's
own key (an expired one, one for another nonce) and check that the sidecar refuses them for that reason alone.
Accounts (any password at its login form): `operator` (groups platform), `viewer` (groups readers), `nobody`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.processes import terminate
from tests.support.waits import free_port

HERE = Path(__file__).resolve().parent / "oidc"
CLIENT_ID = "sidecar-console"
KID = "test-key-1"


def missing() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (bash scripts/dev.sh install: apt-get install nodejs npm)"
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed (bash scripts/dev.sh install runs npm ci in tests/support/oidc)"
    return None


class OidcProvider:
    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.secret = secrets.token_urlsafe(24)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-oidc-"))
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key)) | {"kid": KID, "use": "sig", "alg": "RS256"}
        (self.dir / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
        self.secret_file = self.dir / "client-secret"
        self.secret_file.write_text(self.secret + "\n")
        self.log = open(self.dir / "provider.log", "wb")  # noqa: SIM115 - open while it runs
        self.proc = subprocess.Popen(
            ["node", "provider.js", str(self.port), str(self.dir / "jwks.json"), self.secret],
            cwd=HERE, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "NODE_ENV": "test"},
        )  # fmt: skip
        self._wait()

    def _wait(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"oidc-provider exited: {(self.dir / 'provider.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("oidc-provider did not start listening")

    def sign(self, claims: dict[str, Any], key: Any = None, kid: str = KID) -> str:
        """An ID token signed with the provider's key (or `key`), as the provider's own would be."""
        import jwt

        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid})

    def console_options(self, **more: Any) -> dict[str, Any]:
        """The sidecar's `[console]` options for this provider (flags for `sidecar_factory`)."""
        return {
            "console__enabled": True,
            "console__oidc_issuer": self.issuer,
            "console__oidc_client_id": CLIENT_ID,
            "console__oidc_client_secret_file": str(self.secret_file),
            "console__oidc_operator_claim": "groups=platform",
            "console__oidc_viewer_claim": "groups=readers",
            "console__oidc_scopes": ("openid", "email", "groups"),
            **more,
        }

    def stop(self) -> None:
        terminate(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
