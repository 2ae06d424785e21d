"""Operators sign in to the console at their OpenID provider (#31): a real provider (npm's oidc-provider, run by
node, `oidc_provider`), the authorization code flow with PKCE, roles by a claim, in headless Chromium as
tests/test_console_browser.py drives it, and without a browser where a test needs to alter what the provider
sends (a state that is not this sign-in's) or to sign tokens with the provider's key (an expired one)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest

from sidecar.admin.oidc import Oidc
from sidecar.config import ConfigError, ConsoleCfg, load
from sidecar.errors import Unauthorized
from tests.support.browser import chrome
from tests.support.clients import ADMIN, admin
from tests.support.oidc_provider import CLIENT_ID

# --- in a browser ------------------------------------------------------------------------------------------------


def sign_in(d: Any, url: str, login: str) -> None:
    """At the console: the provider's button, its login form (any password), and back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(d, 20)
    d.get(url + "/console/")
    button = wait.until(ec.visibility_of_element_located((By.ID, "oidc-signin")))
    assert button.text == "Sign in with 127.0.0.1"
    button.click()
    wait.until(ec.visibility_of_element_located((By.NAME, "login"))).send_keys(login)
    d.find_element(By.NAME, "password").send_keys("any password")
    d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda drv: drv.current_url.startswith(url))


def fetch(d: Any, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """The page's own fetch with its CSRF token, as a person forcing a change past hidden buttons would."""
    return dict(
        d.execute_async_script(
            "const [method, path, body, done] = arguments;"
            "fetch('/console/api/session').then((r) => r.json()).then((s) => fetch('/console/api/' + path, {"
            "  method, credentials: 'same-origin',"
            "  headers: {'content-type': 'application/json', 'x-csrf-token': s.csrf || ''},"
            "  body: body === null ? undefined : JSON.stringify(body)}))"
            ".then(async (r) => done({status: r.status, body: await r.json().catch(() => null)}));",
            method,
            path,
            body,
        )
    )


def operator_walk(url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome()
    wait = WebDriverWait(d, 20)
    out: dict[str, Any] = {}
    try:
        sign_in(d, url, "operator")
        wait.until(ec.visibility_of_element_located((By.ID, "operator")))
        out["who"] = d.find_element(By.ID, "who").text
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=keys]").click()
        d.find_element(By.ID, "new-name").send_keys("made-by-oidc-operator")
        d.find_element(By.CSS_SELECTOR, "#create-form button").click()
        wait.until(ec.visibility_of_element_located((By.ID, "created")))
        out["created"] = d.find_element(By.ID, "created-key").text
        out["keys_before_sign_out"] = fetch(d, "GET", "keys")["status"]
        d.find_element(By.ID, "logout").click()
        wait.until(ec.visibility_of_element_located((By.ID, "signin")))
        out["keys_after_sign_out"] = fetch(d, "GET", "keys")
        # The console's own errors (not the provider's login page's; not the 401 asked for above)
        logged = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]
        out["errors"] = [m for m in logged if m.startswith(url) and "status of 401" not in m]
    finally:
        d.quit()
    return out


def viewer_walk(url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome()
    wait = WebDriverWait(d, 20)
    out: dict[str, Any] = {}
    try:
        sign_in(d, url, "viewer")
        wait.until(ec.visibility_of_element_located((By.ID, "operator")))
        out["who"] = d.find_element(By.ID, "who").text
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=keys]").click()
        wait.until(lambda drv: "made-by-admin" in drv.find_element(By.ID, "keys").text)
        out["create_form_shown"] = d.find_element(By.ID, "create-form").is_displayed()
        out["usage"] = fetch(d, "GET", "usage")["status"]
        out["audit"] = fetch(d, "GET", "audit")["status"]
        out["create"] = fetch(d, "POST", "keys", {"name": "forced"})
        key_id = fetch(d, "GET", "keys")["body"]["data"][0]["id"]
        out["update"] = fetch(d, "PATCH", f"keys/{key_id}", {"rpm": 1})
        out["revoke"] = fetch(d, "DELETE", f"keys/{key_id}")
        out["sign_out"] = fetch(d, "DELETE", "session")["status"]
    finally:
        d.quit()
    return out


def refused_walk(url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    d = chrome()
    try:
        sign_in(d, url, "nobody")
        refused = d.find_element(By.ID, "refused")
        return {
            "code": refused.get_attribute("data-code"),
            "text": refused.text,
            "session": fetch(d, "GET", "session")["body"],
        }
    finally:
        d.quit()


async def oidc_sidecar(fake: Any, sidecar_factory: Any, provider: Any, **more: Any) -> Any:
    options = provider.console_options(**more)
    return await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, **options)


async def test_an_operator_signs_in_at_the_provider_changes_keys_named_in_the_audit_log(
    fake, sidecar_factory, oidc_provider
):
    running = await oidc_sidecar(fake, sidecar_factory, oidc_provider)
    out = await asyncio.to_thread(operator_walk, running.url)
    assert out["who"] == "operator op@example.test"
    assert out["created"].startswith("sk-")
    assert out["keys_before_sign_out"] == 200
    assert out["keys_after_sign_out"]["status"] == 401  # signed out: the session is gone on the server
    assert out["keys_after_sign_out"]["body"]["error"]["code"] == "console_session"
    assert out["errors"] == []
    async with aiohttp.ClientSession() as s:
        _, audit, _ = await admin(s, "GET", running.url + "/admin/audit")
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "by-token"})
        _, audit_after, _ = await admin(s, "GET", running.url + "/admin/audit")
    creation = next(e for e in audit["data"] if e["action"] == "key.create")
    assert creation["actor"] == "oidc:operator op@example.test"
    by_token = next(e for e in audit_after["data"] if e["target"] == created["id"])
    assert by_token["actor"].startswith("admin-api:")  # the admin token stays, for automation and break-glass


async def test_a_viewer_sees_keys_and_usage_and_every_change_is_refused_by_the_server(
    fake, sidecar_factory, oidc_provider
):
    running = await oidc_sidecar(fake, sidecar_factory, oidc_provider)
    async with aiohttp.ClientSession() as s:
        status, made, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "made-by-admin"})
        assert status == 201
        out = await asyncio.to_thread(viewer_walk, running.url)
        _, key, _ = await admin(s, "GET", running.url + f"/admin/keys/{made['id']}")
        _, audit, _ = await admin(s, "GET", running.url + "/admin/audit")
    assert out["who"] == "operator viewer@example.test (read-only)"
    assert out["create_form_shown"] is False
    assert out["usage"] == out["audit"] == 200
    for change in ("create", "update", "revoke"):
        assert out[change]["status"] == 403, out[change]
        assert out[change]["body"]["error"]["code"] == "console_read_only"
    assert out["sign_out"] == 200  # a viewer can still end their own session
    assert key["revoked_at"] is None and key["rpm"] is None
    assert [e["action"] for e in audit["data"]] == ["key.create"]


async def test_an_account_with_neither_claim_is_refused(fake, sidecar_factory, oidc_provider):
    running = await oidc_sidecar(fake, sidecar_factory, oidc_provider)
    out = await asyncio.to_thread(refused_walk, running.url)
    assert out["code"] == "oidc_no_role"
    assert "not an operator" in out["text"]
    assert out["session"]["role"] is None


# --- without a browser -------------------------------------------------------------------------------------------


async def to_callback(s: aiohttp.ClientSession, url: str, login: str) -> str:
    """The flow up to the provider's redirect back: the callback URL it sends the browser to (not followed)."""
    async with s.get(url + "/console/oidc/login", allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        at = r.headers["location"]
    for _ in range(10):
        if at.startswith(url + "/console/oidc/callback"):
            return at
        async with s.get(at, allow_redirects=False) as r:
            if r.status in (302, 303):
                at = urljoin(at, r.headers["location"])
                continue
            page = await r.text()
        action = urljoin(at, re.search(r'action="([^"]+)"', page).group(1))  # the provider's login form
        async with s.post(
            action, data={"prompt": "login", "login": login, "password": "x"}, allow_redirects=False
        ) as r:
            at = urljoin(action, r.headers["location"])
    raise AssertionError("the provider never sent the browser back")


async def callback(s: aiohttp.ClientSession, at: str) -> tuple[int, str]:
    async with s.get(at, allow_redirects=False) as r:
        return r.status, await r.text()


async def test_the_flow_sends_pkce_and_a_state_is_good_once_and_only_its_own(fake, sidecar_factory, oidc_provider):
    running = await oidc_sidecar(fake, sidecar_factory, oidc_provider)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(running.url + "/console/oidc/login", allow_redirects=False) as r:
            sent = r.headers["location"]
        assert "code_challenge_method=S256" in sent and "nonce=" in sent and "state=" in sent
        at = await to_callback(s, running.url, "operator")
        forged = re.sub(r"state=[^&]+", "state=not-this-sign-ins", at)
        status, page = await callback(s, forged)
        assert status == 400 and 'data-code="oidc_state"' in page
        status, _ = await callback(s, at)
        assert status == 303  # the real one still works: the forged state took nothing
        async with s.get(running.url + "/console/api/session") as r:
            me = await r.json()
        assert me["role"] == "admin" and me["name"] == "op@example.test" and me["read_only"] is False
        status, page = await callback(s, at)  # replayed: its state was used
        assert status == 400 and 'data-code="oidc_state"' in page
        status, page = await callback(s, running.url + "/console/oidc/callback?error=access_denied&state=x")
        assert status == 401 and 'data-code="oidc_refused"' in page


async def test_a_viewer_session_made_without_a_browser_is_refused_changes(fake, sidecar_factory, oidc_provider):
    running = await oidc_sidecar(fake, sidecar_factory, oidc_provider)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        status, _ = await callback(s, await to_callback(s, running.url, "viewer"))
        assert status == 303
        async with s.get(running.url + "/console/api/session") as r:
            csrf = (await r.json())["csrf"]
        async with s.post(running.url + "/console/api/keys", json={"name": "x"}, headers={"x-csrf-token": csrf}) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "console_read_only"
        async with s.get(running.url + "/console/api/keys") as r:
            assert r.status == 200


# --- the ID token, checked with the provider's real keys ---------------------------------------------------------


def validator(provider: Any) -> Oidc:
    cfg = ConsoleCfg(
        enabled=True, oidc_issuer=provider.issuer, oidc_client_id=CLIENT_ID,
        oidc_client_secret_file=str(provider.secret_file), oidc_operator_claim="groups=platform",
    )  # fmt: skip
    return Oidc(cfg)


def claims(provider: Any, **more: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": provider.issuer, "aud": CLIENT_ID, "sub": "operator", "iat": now, "exp": now + 300} | {
        "nonce": "the-nonce",
        **more,
    }


async def refused(oidc: Oidc, token: str, nonce: str = "the-nonce") -> str:
    with pytest.raises(Unauthorized) as caught:
        await oidc.validate(token, nonce)
    assert caught.value.code == "oidc_id_token"
    return caught.value.message


async def test_the_id_token_is_checked_signature_issuer_audience_expiry_and_nonce(oidc_provider):
    from cryptography.hazmat.primitives.asymmetric import rsa

    oidc = validator(oidc_provider)
    good = oidc_provider.sign(claims(oidc_provider))
    assert (await oidc.validate(good, "the-nonce"))["sub"] == "operator"  # the provider's key, from its JWKS
    head, body, sig = good.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    assert "Signature verification failed" in await refused(oidc, f"{head}.{body}.{flipped}")
    other = oidc_provider.sign(claims(oidc_provider, sub="someone-else"))
    assert "Signature" in await refused(oidc, f"{head}.{other.split('.')[1]}.{sig}")  # a payload swapped in
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "Signature" in await refused(oidc, oidc_provider.sign(claims(oidc_provider), key=stranger))
    assert "does not publish" in await refused(oidc, oidc_provider.sign(claims(oidc_provider), kid="unknown"))
    past = int(time.time()) - 3600
    expired = oidc_provider.sign(claims(oidc_provider, iat=past - 300, exp=past))
    assert "expired" in await refused(oidc, expired)
    assert "nonce" in await refused(oidc, good, nonce="another-sign-ins-nonce")
    assert "Audience" in await refused(oidc, oidc_provider.sign(claims(oidc_provider, aud="another-client")))
    assert "issuer" in await refused(oidc, oidc_provider.sign(claims(oidc_provider, iss="http://127.0.0.1:1")))
    assert "not accepted" in await refused(oidc, "eyJhbGciOiJub25lIn0." + good.split(".")[1] + ".")  # alg none
    forever = claims(oidc_provider)
    del forever["exp"]
    assert "exp" in await refused(oidc, oidc_provider.sign(forever))


def test_the_settings_are_checked(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s")
    base = {
        "console.oidc_issuer": "https://login.example.com/realms/x",
        "console.oidc_client_id": "c",
        "console.oidc_client_secret_file": str(secret),
        "console.oidc_operator_claim": "groups=platform",
    }
    assert load(None, {}, base).console.oidc_issuer == base["console.oidc_issuer"]
    for change, said in (
        ({"console.oidc_issuer": "http://login.example.com"}, "https"),
        ({"console.oidc_client_id": ""}, "oidc_client_id: required"),
        ({"console.oidc_operator_claim": "platform"}, "CLAIM=VALUE"),
        ({"console.oidc_viewer_claim": "groups="}, "CLAIM=VALUE"),
        ({"console.oidc_scopes": "email"}, "openid"),
    ):
        with pytest.raises(ConfigError, match=said):
            load(None, {}, base | change)
    loopback = base | {"console.oidc_issuer": "http://127.0.0.1:8080"}
    assert load(None, {}, loopback).console.oidc_issuer == "http://127.0.0.1:8080"
