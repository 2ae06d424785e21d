"""The web console in a real browser (#19): Debian's chromium, headless, driven by Selenium through
chromium-driver, against a real sidecar with real requests made through it. Screenshots of each page go to
test-artifacts/console/ (the README shows copies from docs/console/)."""

from __future__ import annotations

import asyncio
import json
import time
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


def cells(d: Any, table: str, name: str) -> dict[str, str]:
    """The row of table `table` that holds `name`, by column header."""
    from selenium.webdriver.common.by import By

    heads = [th.text for th in d.find_elements(By.CSS_SELECTOR, f"#{table} th")]
    row = next(r for r in d.find_elements(By.CSS_SELECTOR, f"#{table} tr") if name in r.text)
    return dict(zip(heads, [td.text for td in row.find_elements(By.TAG_NAME, "td")], strict=True))


def fill(d: Any, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    box = d.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def edit_a_key(d: Any, key_id: str, out: dict[str, Any]) -> None:
    """The keys tab's edit dialog: tpm, budget, models, expiry and priority changed; then a value the admin API
    refuses, its message shown in the dialog."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(d, 15)
    d.find_element(By.CSS_SELECTOR, f"button[data-edit='{key_id}']").click()
    dialog = wait.until(ec.visibility_of_element_located((By.ID, "edit-dialog")))
    labelled = d.execute_script(
        "return [...document.querySelectorAll('#edit-form input, #edit-form select')].map((e) => e.labels.length);"
    )
    out["unlabelled_fields"] = labelled.count(0)
    out["edit_labels"] = [label.text for label in dialog.find_elements(By.TAG_NAME, "label")]
    fill(d, "e-tpm", "5000")
    fill(d, "e-budget", "90000")
    fill(d, "e-period", "week")
    fill(d, "e-models", "fake-model, other-model")
    fill(d, "e-expires", "30d")
    Select(d.find_element(By.ID, "e-priority")).select_by_visible_text("high")
    d.save_screenshot(str(SHOTS / "key-edit.png"))
    d.find_element(By.CSS_SELECTOR, "#edit-form button[type=submit]").click()
    wait.until(ec.invisibility_of_element_located((By.ID, "edit-dialog")))
    wait.until(lambda drv: "5,000" in row_of(drv, "edit-me"))
    out["edited_row"] = cells(d, "keys", "edit-me")
    out["stored_expiry_shown"] = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/console/api/keys/' + arguments[0]).then((r) => r.json()).then((k) => done(new Date(k.expires_at *"
        " 1000).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' })));",
        key_id,
    )
    d.find_element(By.CSS_SELECTOR, f"button[data-edit='{key_id}']").click()
    wait.until(ec.visibility_of_element_located((By.ID, "edit-dialog")))
    out["models_shown_in_dialog"] = d.find_element(By.ID, "e-models").get_attribute("value")
    fill(d, "e-weight", "0")
    d.find_element(By.CSS_SELECTOR, "#edit-form button[type=submit]").click()
    wait.until(lambda drv: drv.find_element(By.ID, "edit-error").text)
    out["edit_error"] = d.find_element(By.ID, "edit-error").text
    out["dialog_open_after_error"] = d.find_element(By.ID, "edit-dialog").is_displayed()
    d.find_element(By.ID, "edit-cancel").click()
    wait.until(ec.invisibility_of_element_located((By.ID, "edit-dialog")))


def walk(url: str, traffic_key: str, edit_id: str) -> dict[str, Any]:
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
        out["top_key_title"] = d.find_element(By.CSS_SELECTOR, "#top-keys td span").get_attribute("title")
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
        edit_a_key(d, edit_id, out)
        # The request log, filtered to the 429s; one row opened.
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=requests]").click()
        Select(d.find_element(By.ID, "f-outcome")).select_by_visible_text("rate_limited")
        d.find_element(By.CSS_SELECTOR, "#filter-form button").click()
        wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#requests tr.pick")) >= 2)
        rows = d.find_elements(By.CSS_SELECTOR, "#requests tr.pick")
        out["filtered_outcomes"] = sorted({r.find_elements(By.TAG_NAME, "td")[4].text for r in rows})
        out["request_keys"] = sorted({r.find_elements(By.TAG_NAME, "td")[1].text for r in rows})
        rows[0].click()
        out["detail"] = json.loads(d.find_element(By.ID, "request-detail").text)
        d.save_screenshot(str(SHOTS / "requests.png"))
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=audit]").click()
        wait.until(lambda drv: "revoke" in drv.find_element(By.ID, "audit").text)
        out["audit"] = d.find_element(By.ID, "audit").text
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
        _, edit_me, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "edit-me"})
        async with s.post(
            running.url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {edit_me['key']}"}
        ) as r:
            assert r.status == 200
    await running.stored(5)
    out = await asyncio.to_thread(walk, running.url, traffic["key"], edit_me["id"])
    print(f"\nconsole: first load {out['timing']['load_ms']:.0f} ms, {out['timing']['bytes']} bytes transferred "
          f"({out['timing']['decoded']} decoded)")  # fmt: skip
    assert out["usage_bars"] > 0
    head, row, second = out["top_keys"].splitlines()[:3]
    assert head == "key requests tokens cached cache write reasoning failed"
    assert row.startswith(f"traffic {traffic['id']} ") and second.startswith(f"edit-me {edit_me['id']} ")  # named
    assert out["top_key_title"] == traffic["id"]  # and on hover
    assert row.split()[4:7] == ["6", "0", "4"], row  # cached 2 x 3, no cache write, reasoning 2 x 2
    assert out["cookie"] == {"httpOnly": True, "sameSite": "Strict", "path": "/console"}
    assert out["cookie_visible_to_script"] == "" and out["inline_script_ran"] is False  # HttpOnly; CSP holds
    assert out["sdk_before_revoke"] and out["sdk_after_revoke"] == 401
    assert out["filtered_outcomes"] == ["rate_limited"] and out["detail"]["status"] == 429
    assert out["request_keys"] == [f"traffic {traffic['id']}"]
    assert f"key.update edit-me {edit_me['id']}" in out["audit"]
    # The edit dialog: every field labelled; the table shows what was saved; the API's own message for a bad value.
    assert out["unlabelled_fields"] == 0 and len(out["edit_labels"]) == 12, out["edit_labels"]
    shown = out["edited_row"]
    assert (shown["tpm"], shown["budget"], shown["priority"]) == ("5,000", "90,000 / week", "high"), shown
    assert shown["models"] == "fake-model, other-model" and shown["expires"] == out["stored_expiry_shown"], shown
    assert out["models_shown_in_dialog"] == "fake-model, other-model"
    assert out["edit_error"] == "`weight` must be a number above 0 and at most 1000, or null."
    assert out["dialog_open_after_error"] is True
    async with aiohttp.ClientSession() as s:
        _, stored, _ = await admin(s, "GET", running.url + f"/admin/keys/{edit_me['id']}")
        _, log, _ = await admin(s, "GET", running.url + "/admin/audit")
    assert (stored["tpm"], stored["budget_tokens"], stored["budget_period"]) == (5000, 90000, "week")
    assert (stored["models"], stored["priority"], stored["weight"]) == (["fake-model", "other-model"], "high", None)
    assert abs(stored["expires_at"] - (time.time() + 30 * 86400)) < 120
    (update,) = [e for e in log["data"] if e["target"] == edit_me["id"] and e["action"] == "key.update"]
    assert update["actor"].startswith("console:")  # only what was changed was sent; the refused weight is not there
    assert set(update["changes"]) == {"tpm", "budget_tokens", "budget_period", "models", "expires_at", "priority"}
    assert out["queue_summary"].startswith("Order fair; 0 of 1,024 upstream slots in use"), out["queue_summary"]
    queue_rows = out["queue_keys"].splitlines()
    assert queue_rows[0] == "key id waiting by class running tokens served share", queue_rows
    assert any(r.startswith(f"traffic {traffic['id']} 0 0") and r.endswith("%") for r in queue_rows), queue_rows
    assert "traffic" in out["holder_table"] and "made-in-browser" not in out["holder_page"]
    # The errors the walk causes on purpose: the inline script CSP refused, the bad weight's 400. Nothing else failed.
    on_purpose = ("Content Security Policy", f"/console/api/keys/{edit_me['id']} - Failed to load resource: the "
                  "server responded with a status of 400")  # fmt: skip
    assert not [e for e in out["console_errors"] if not any(m in e["message"] for m in on_purpose)], out
