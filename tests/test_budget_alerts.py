"""Told before a budget runs out (#31): per-key budget figures and refusals in /metrics (bounded labels), the
chart's alert rules on them (promtool's unit tests, and a real Prometheus that scrapes a sidecar whose keys are
near and at their budgets), and the console's keys table marking them."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable

import aiohttp
import orjson
import yaml

from sidecar.keys.format import hash_secret, new_key
from sidecar.ops.metrics import MAX_KEYS
from tests.support.browser import chrome
from tests.support.clients import ADMIN, admin
from tests.support.prometheus import JOB, Prometheus, rules, tool

USED = 11 + 5  # the fake upstream's usage per chat answer
SMALL = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def value(text: str, series: str) -> float | None:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


async def ask(s: aiohttp.ClientSession, url: str, key: str) -> tuple[int, dict]:
    async with s.post(url + "/v1/chat/completions", json=SMALL, headers={"authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


async def make(s: aiohttp.ClientSession, url: str, name: str, **fields: object) -> dict:
    status, created, _ = await admin(s, "POST", url + "/admin/keys", {"name": name, **fields})
    assert status == 201, created
    return created


async def spend(s: aiohttp.ClientSession, url: str, key: str) -> int:
    """Requests of `key` until its budget refuses one (a 429 `insufficient_quota`): how many were answered. The
    fake upstream uses 5 completion tokens where 1 was reserved, so a small budget ends used to the last token."""
    for answered in range(50):
        status, body = await ask(s, url, key)
        if status != 200:
            assert status == 429 and body["error"]["code"] == "insufficient_quota", body
            return answered
    raise AssertionError("the budget never refused")


async def scrape(url: str, ready: Callable[[str], bool] = lambda text: True) -> str:
    """/metrics once `ready` says so (15 s at most): a scrape waits at most a second for the figures' refresh and
    a slower one (a loaded machine) lands in a later scrape."""
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(url + "/metrics") as r:
                assert r.status == 200
                text = await r.text()
            if ready(text) or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.2)


async def test_budget_figures_and_refusals_per_key_after_traffic(fake, sidecar_factory, store_url):
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, limits__budget_metrics_refresh=0, store__url=store_url
    )
    url = running.url
    async with aiohttp.ClientSession() as s:
        near = await make(s, url, "near", budget_tokens=100, budget_period="1h")
        free = await make(s, url, "free", rpm=1)
        answered = await spend(s, url, near["key"])
        assert [(await ask(s, url, free["key"]))[0] for _ in range(2)] == [200, 429]  # the key's rpm
        await running.stored(answered + 3)  # the gauges count stored rows
        kid = near["id"]
        text = await scrape(url, lambda text: f'sidecar_key_budget_used_ratio{{key_id="{kid}"}}' in text)
        _, listed, _ = await admin(s, "GET", url + "/admin/keys")
    used = answered * USED
    assert value(text, f'sidecar_key_budget_tokens{{key_id="{kid}"}}') == 100
    assert value(text, f'sidecar_key_budget_remaining_tokens{{key_id="{kid}"}}') == max(0, 100 - used)
    assert value(text, f'sidecar_key_budget_used_ratio{{key_id="{kid}"}}') == used / 100
    assert used / 100 >= 0.8  # what the rules below fire on
    assert value(text, f'sidecar_key_limited_total{{key_id="{kid}",reason="budget"}}') == 1
    assert value(text, f'sidecar_key_limited_total{{key_id="{free["id"]}",reason="rpm"}}') == 1
    assert f'sidecar_key_budget_used_ratio{{key_id="{free["id"]}"}}' not in text  # no budget: no figure
    assert f'sidecar_key_limited_total{{key_id="{kid}",reason="rpm"}}' not in text
    shown = {k["name"]: k for k in listed["data"]}
    assert shown["near"]["budget_used_ratio"] == used / 100 and shown["near"]["budget_remaining"] == max(0, 100 - used)
    assert "budget_used_ratio" not in shown["free"]


async def test_per_key_series_stay_bounded_beyond_max_keys(fake, sidecar_factory, tmp_path):
    """MAX_KEYS + 3 keys each refused by a budget of 1 token: the first MAX_KEYS have series of their own, the
    refusals of the rest count under `other`, and the budget gauges stop at MAX_KEYS keys."""
    pepper, static = tmp_path / "pepper", tmp_path / "keys.jsonl"
    pepper.write_text("static-pepper-0123456789\n")
    keys, lines = [], []
    for n in range(MAX_KEYS + 3):
        key, kid, secret = new_key()
        keys.append(key)
        row = {"id": kid, "name": f"k{n}", "hash": hash_secret(b"static-pepper-0123456789", secret), "created_at": 1.0}
        lines.append(orjson.dumps({**row, "budget_tokens": 1, "budget_period": "1h"}) + b"\n")
    static.write_bytes(b"".join(lines))
    running = await sidecar_factory(
        fake.url, auth__enabled=True, auth__pepper_file=str(pepper), auth__static_keys_file=str(static)
    )
    async with aiohttp.ClientSession() as s:
        for key in keys:
            assert (await ask(s, running.url, key))[0] == 429
    gauges = re.compile(r"^sidecar_key_budget_used_ratio\{", re.M)
    text = await scrape(running.url, lambda text: len(gauges.findall(text)) >= MAX_KEYS)
    limited = re.findall(r'^sidecar_key_limited_total\{key_id="([^"]+)",reason="budget"\} (\S+)$', text, re.M)
    assert len(limited) == MAX_KEYS + 1
    assert dict(limited)["other"] == "3.0"
    assert len(gauges.findall(text)) == MAX_KEYS
    assert len(re.findall(r"^sidecar_key_budget_tokens\{", text, re.M)) == MAX_KEYS


def expected(rule: dict, value: str = "", **labels: str) -> dict:
    """The alert promtool must see: the rule's labels and the key's, its annotations as Prometheus fills them in."""

    def filled(text: str) -> str:
        text = text.replace("{{ $value | humanizePercentage }}", value)
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    annotations = {name: filled(text) for name, text in rule["annotations"].items()}
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def test_promtool_unit_tests_the_key_alerts(helm, tmp_path):
    """Series in, alerts out, minute by minute: 80% and 100% of a budget (the highest figure of any replica), and
    refusals that go on for 5 minutes (a single one never fires)."""
    groups = rules(helm)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    by_name = {r["alert"]: r for r in groups[0]["rules"]}
    low, out = by_name["SidecarKeyBudgetLow"], by_name["SidecarKeyBudgetExhausted"]
    limited = by_name["SidecarKeyLimited"]
    on = f'job="{JOB}",pod="p0"'
    series = [
        (f'sidecar_key_budget_used_ratio{{{on},key_id="near"}}', "0.5 0.79 0.8 0.95 0.95 0.95 0.95"),
        (f'sidecar_key_budget_used_ratio{{job="{JOB}",pod="p1",key_id="near"}}', "0.1x6"),  # a replica behind
        (f'sidecar_key_budget_used_ratio{{{on},key_id="full"}}', "0.9 1 1.2 1.2 1.2 1.2 1.2"),
        (f'sidecar_key_limited_total{{{on},key_id="busy",reason="rpm"}}', "0+3x10"),
        (f'sidecar_key_limited_total{{{on},key_id="once",reason="tpm"}}', "0 1 1x8"),
    ]
    cases = [
        ("0m", low, [expected(low, "90%", key_id="full")]),
        ("1m", low, []),
        ("1m", out, [expected(out, key_id="full")]),
        ("2m", low, [expected(low, "80%", key_id="near")]),
        ("5m", limited, []),  # refused for 4 minutes: pending
        ("6m", limited, [expected(limited, key_id="busy", reason="rpm")]),
    ]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": rule["alert"], "exp_alerts": alerts} for at, rule, alerts in cases
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    checked = subprocess.run(
        [tool("promtool"), "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_a_real_prometheus_fires_the_budget_alerts(fake, sidecar_factory, helm, tmp_path):
    groups = rules(helm, keyLimitedFor="0s")  # so the refusals' alert fires within the test
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    running = await sidecar_factory(
        fake.url, auth__enabled=True, server__admin_token=ADMIN, limits__budget_metrics_refresh=0
    )
    url = running.url
    async with aiohttp.ClientSession() as s:
        near = await make(s, url, "near", budget_tokens=100, budget_period="1h")
        full = await make(s, url, "full", budget_tokens=32, budget_period="1h")
        answered = await spend(s, url, near["key"]) + await spend(s, url, full["key"])
        await running.stored(answered + 2)
    text = await scrape(url, lambda text: f'sidecar_key_budget_used_ratio{{key_id="{full["id"]}"}}' in text)
    assert 0.8 <= value(text, f'sidecar_key_budget_used_ratio{{key_id="{near["id"]}"}}') < 1
    assert value(text, f'sidecar_key_budget_used_ratio{{key_id="{full["id"]}"}}') >= 1
    prom = Prometheus(tmp_path, f"127.0.0.1:{running.port}", rule_file)
    try:
        firing = await refused_until_firing(prom, url, full["key"])
    finally:
        prom.close()
    assert firing == {
        ("SidecarKeyBudgetLow", near["id"], None),
        ("SidecarKeyBudgetExhausted", full["id"], None),
        ("SidecarKeyLimited", full["id"], "budget"),
    }


async def refused_until_firing(prom: Prometheus, url: str, key: str) -> set[tuple[str, str, str | None]]:
    """The key keeps being refused (a counter's first sample is no increase: it must grow while scraped) until
    the three alerts fire, or 30 s pass: the firing alerts as (name, key id, reason)."""
    firing: set[tuple[str, str, str | None]] = set()
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while len(firing) < 3 and time.monotonic() < deadline:
            assert (await ask(s, url, key))[0] == 429
            await asyncio.sleep(0.5)
            try:
                alerts = (await prom.api(s, "/api/v1/alerts"))["alerts"]
            except aiohttp.ClientError:  # not listening yet
                continue
            firing = {
                (a["labels"]["alertname"], a["labels"]["key_id"], a["labels"].get("reason"))
                for a in alerts
                if a["state"] == "firing"
            }
    return firing


def budget_column(url: str) -> dict[str, tuple[str, str]]:
    """The keys table's "budget used" cell per key name, (text, class), as an operator sees it in Chromium."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome()
    try:
        d.get(url + "/console/")
        d.find_element(By.ID, "token").send_keys(ADMIN)
        d.find_element(By.CSS_SELECTOR, "#signin-form button").click()
        WebDriverWait(d, 15).until(ec.visibility_of_element_located((By.ID, "operator")))
        d.find_element(By.CSS_SELECTOR, "nav button[data-tab=keys]").click()
        WebDriverWait(d, 15).until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#keys tr")) == 4)
        heads = [th.text for th in d.find_elements(By.CSS_SELECTOR, "#keys tr th")]
        col = heads.index("budget used")
        cells = {}
        for row in d.find_elements(By.CSS_SELECTOR, "#keys tr")[1:]:
            tds = row.find_elements(By.TAG_NAME, "td")
            marks = tds[col].find_elements(By.TAG_NAME, "span")
            cells[tds[0].text] = (tds[col].text, marks[0].get_attribute("class") if marks else "")
        return cells
    finally:
        d.quit()


async def test_the_console_marks_keys_near_and_at_their_budget(fake, sidecar_factory):
    running = await sidecar_factory(fake.url, auth__enabled=True, server__admin_token=ADMIN, console__enabled=True)
    url = running.url
    async with aiohttp.ClientSession() as s:
        near = await make(s, url, "near", budget_tokens=100, budget_period="1h")
        full = await make(s, url, "full", budget_tokens=32, budget_period="1h")
        await make(s, url, "plain")
        near_answered, full_answered = await spend(s, url, near["key"]), await spend(s, url, full["key"])
        await running.stored(near_answered + full_answered + 2)
    cells = await asyncio.to_thread(budget_column, url)
    assert 80 <= near_answered * USED < 100  # a warning: 80% or more
    assert cells["near"] == (f"{near_answered * USED}%", "warn")
    assert full_answered * USED == 32 and cells["full"] == ("100%", "refused")
    assert cells["plain"] == ("", "")
