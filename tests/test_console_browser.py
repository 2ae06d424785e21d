"""The web console in a real browser (#19): Debian's chromium, headless, driven by Selenium through
chromium-driver, against a real sidecar with real requests made through it. Screenshots of each page go to
test-artifacts/console/ (the README shows copies from docs/console/)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.support.browser import chrome
from tests.support.clients import ADMIN, admin

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "console"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def row_of(d: Any, name: str) -> str:
    """The text of the keys table's row for `name` ("" while the table is being drawn again)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return next((r.text for r in d.find_elements(By.CSS_SELECTOR, "#keys tr") if name in r.text), "")
    except StaleElementReferenceException:
        return ""


def walk(url: str, traffic_key: str) -> dict[str, Any]:
    """Everything a person does in the console, in one browser (run in a thread: the sidecar is on the loop)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    SHOTS.mkdir(parents=True, exist_ok=True)
    d = chrome()
    wait = WebDriverWait(d, 15)
    out: dict[str, Any] = {}
    try:
        d.get(url + "/console/")
        timing = d.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "const r = performance.getEntriesByType('resource');"
            "return {load_ms: n.loadEventEnd - n.startTime,"
            " bytes: n.transferSize + r.reduce((a, e) => a + e.transferSize, 0),"
            " decoded: n.decodedBodySize + r.reduce((a, e) => a + e.decodedBodySize, 0)};"
        )
        out["timing"] = timing
        d.find_element(By.ID, "token").send_keys(ADMIN)
        d.find_element(By.CSS_SELECTOR, "#signin-form button").click()
        wait.until(ec.visibility_of_element_located((By.ID, "operator")))
        wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "#chart-usage svg rect"))
        wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "#chart-outcomes svg rect"))
        out["usage_bars"] = len(d.find_elements(By.CSS_SELECTOR, "#chart-usage svg rect"))
        out["top_keys"] = d.find_element(By.ID, "top-keys").text
        d.save_screenshot(str(SHOTS / "operator-usage.png"))
        cookie = d.get_cookie("sidecar_console")
        out["cookie"] = {"httpOnly": cookie["httpOnly"], "sameSite": cookie["sameSite"], "path": cookie["path"]}
        out["cookie_visible_to_script"] = d.execute_script("return document.cookie")
        out["inline_script_ran"] = d.execute_script(
            "const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
            "document.head.append(s); return window.__inline === 1;"
        )
        # Keys: create one in the page, use it with the openai SDK, revoke it in the page.
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=keys]").click()
        d.find_element(By.ID, "new-name").send_keys("made-in-browser")
        d.find_element(By.ID, "new-rpm").send_keys("100")
        d.find_element(By.CSS_SELECTOR, "#create-form button").click()
        wait.until(ec.visibility_of_element_located((By.ID, "created")))
        key = d.find_element(By.ID, "created-key").text
        d.save_screenshot(str(SHOTS / "keys.png"))
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
        out["sdk_before_revoke"] = answer.choices[0].message.content
        row = next(r for r in d.find_elements(By.CSS_SELECTOR, "#keys tr") if "made-in-browser" in r.text)
        row.find_element(By.CSS_SELECTOR, "button[data-revoke]").click()
        wait.until(ec.alert_is_present()).accept()
        wait.until(lambda drv: "revoked" in row_of(drv, "made-in-browser"))
        try:
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
            out["sdk_after_revoke"] = "answered"
        except openai.AuthenticationError as exc:
            out["sdk_after_revoke"] = exc.status_code
        # The request log, filtered to the 429s; one row opened.
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=requests]").click()
        Select(d.find_element(By.ID, "f-outcome")).select_by_visible_text("rate_limited")
        d.find_element(By.CSS_SELECTOR, "#filter-form button").click()
        wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#requests tr.pick")) >= 2)
        rows = d.find_elements(By.CSS_SELECTOR, "#requests tr.pick")
        out["filtered_outcomes"] = sorted({r.find_elements(By.TAG_NAME, "td")[4].text for r in rows})
        rows[0].click()
        out["detail"] = json.loads(d.find_element(By.ID, "request-detail").text)
        d.save_screenshot(str(SHOTS / "requests.png"))
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=audit]").click()
        wait.until(lambda drv: "revoke" in drv.find_element(By.ID, "audit").text)
        d.save_screenshot(str(SHOTS / "admin-audit.png"))
        # The dispatch queue: nothing waits now; the keys that were served lately, with their shares.
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=queue]").click()
        wait.until(lambda drv: "traffic" in drv.find_element(By.ID, "queue-keys").text)
        out["queue_summary"] = d.find_element(By.ID, "queue-summary").text
        out["queue_keys"] = d.find_element(By.ID, "queue-keys").text
        d.save_screenshot(str(SHOTS / "queue.png"))
        # Sign out; sign in as a key holder.
        d.find_element(By.ID, "logout").click()
        wait.until(ec.visibility_of_element_located((By.ID, "signin")))
        d.find_element(By.ID, "token").send_keys(traffic_key)
        d.find_element(By.CSS_SELECTOR, "#signin-form button").click()
        wait.until(ec.visibility_of_element_located((By.ID, "holder")))
        wait.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "#chart-mine svg rect"))
        out["holder_table"] = d.find_element(By.ID, "my-key").text
        out["holder_page"] = d.find_element(By.TAG_NAME, "body").text
        d.save_screenshot(str(SHOTS / "key-holder.png"))
        out["console_errors"] = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        d.quit()
    return out


async def test_a_person_uses_the_console_in_a_real_browser(fake, sidecar_factory, tmp_path):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True)
    async with aiohttp.ClientSession() as s:
        # Refused by its budget, not its rpm: the key holder's own page costs requests of the key's rpm too.
        limits = {"name": "traffic", "budget_tokens": 1100, "budget_period": "day"}
        _, traffic, _ = await admin(s, "POST", running.url + "/admin/keys", limits)
        statuses = []
        fake.script.cached_tokens, fake.script.reasoning_tokens = 3, 2  # the details have columns of their own
        for max_tokens in (10, 10, 5000, 5000):
            headers = {"authorization": f"Bearer {traffic['key']}"}
            body = {**CHAT, "max_tokens": max_tokens}
            async with s.post(running.url + "/v1/chat/completions", json=body, headers=headers) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429, 429]
    await running.stored(4)
    out = await asyncio.to_thread(walk, running.url, traffic["key"])
    print(f"\nconsole: first load {out['timing']['load_ms']:.0f} ms, {out['timing']['bytes']} bytes transferred "
          f"({out['timing']['decoded']} decoded)")  # fmt: skip
    assert out["usage_bars"] > 0 and traffic["id"] in out["top_keys"]
    head, row = out["top_keys"].splitlines()[:2]
    assert head == "key requests tokens cached cache write reasoning failed"
    assert row.split()[3:6] == ["6", "0", "4"], row  # cached 2 x 3, no cache write, reasoning 2 x 2
    assert out["cookie"] == {"httpOnly": True, "sameSite": "Strict", "path": "/console"}
    assert out["cookie_visible_to_script"] == "" and out["inline_script_ran"] is False  # HttpOnly; CSP holds
    assert out["sdk_before_revoke"] and out["sdk_after_revoke"] == 401
    assert out["filtered_outcomes"] == ["rate_limited"] and out["detail"]["status"] == 429
    assert out["queue_summary"].startswith("Order fair; 0 of 1,024 upstream slots in use"), out["queue_summary"]
    queue_rows = out["queue_keys"].splitlines()
    assert queue_rows[0] == "key id waiting by class running tokens served share", queue_rows
    assert any(r.startswith(f"traffic {traffic['id']} 0 0") and r.endswith("%") for r in queue_rows), queue_rows
    assert "traffic" in out["holder_table"] and "made-in-browser" not in out["holder_page"]
    # The one error the walk causes on purpose: the inline script CSP refused. Nothing else failed.
    assert not [e for e in out["console_errors"] if "Content Security Policy" not in e["message"]], out
