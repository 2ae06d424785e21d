"""Metrics people build on (#18): the chart's Grafana dashboard and PrometheusRule, checked for real.

`promtool check rules` on the rendered rules; then a real Prometheus server (Debian's `prometheus`, started here
on 127.0.0.1) scrapes a real sidecar, and the vLLM page it relays, under a little traffic of every kind. Every
dashboard query and every alert expression must parse and evaluate there, name only series that were really
scraped, and every panel must return data.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests.support.clients import ADMIN, admin
from tests.support.helm import PEPPER, render_values
from tests.support.prometheus import RULE_API, Prometheus, rules, tool

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(row, panel title, PromQL) of every target in the chart's dashboard."""
    import json

    doc = json.loads((ROOT / "helm/sidecar/files/dashboard.json").read_text())
    row, out = "", []
    for panel in doc["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        out += [(row, panel["title"], t["expr"]) for t in panel["targets"]]
    return out


def test_the_dashboard_file_is_what_its_generator_writes():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/dashboard.py"), "--check"], timeout=60)
    assert out.returncode == 0, "helm/sidecar/files/dashboard.json is stale: run python3 scripts/dashboard.py"


def test_the_dashboard_has_a_fairness_row_for_the_dispatch_queue():
    fairness = {title: expr for row, title, expr in dashboard_queries() if row.startswith("Fairness")}
    assert sorted(fairness) == [
        "Queue depth by priority class", "Queue wait by priority class", "Refused by the queue, by reason",
        "Share of tokens served, top 10 keys",
    ]  # fmt: skip
    assert "by (priority)" in fairness["Queue depth by priority class"]
    assert "sidecar_queue_wait_seconds_bucket" in fairness["Queue wait by priority class"]
    assert "queue_full|queue_shed|queue_timeout" in fairness["Refused by the queue, by reason"]
    assert "topk(10" in fairness["Share of tokens served, top 10 keys"]


def test_the_dashboard_and_rules_render_only_when_asked(helm):
    plain = render_values(helm, {"secrets": {"pepper": PEPPER}}, "--api-versions", RULE_API)
    assert not [d for d in plain if d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-dashboard")]
    on = {"secrets": {"pepper": PEPPER}, "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
    assert not [d for d in render_values(helm, on) if d["kind"] == "PrometheusRule"]  # no CRD: no rule
    docs = render_values(
        helm, on, "--api-versions", RULE_API, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"
    )
    (cm,) = [d for d in docs if d["metadata"]["name"] == "t-sidecar-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["sidecar.json"] == (ROOT / "helm/sidecar/files/dashboard.json").read_text().strip()
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics", "/metrics/upstream"]
    upstream_mode = {"mode": "upstream", "upstream": {"url": "http://vllm:8000/v1"}, "secrets": {"pepper": PEPPER}}
    docs = render_values(helm, upstream_mode, "--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]  # no vLLM in the pod: auto is off


def test_promtool_checks_the_rendered_rules(helm, tmp_path):
    path = tmp_path / "rules.yaml"
    groups = rules(helm)
    path.write_text(yaml.safe_dump({"groups": groups}))
    out = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout, out.stdout
    for rule in groups[0]["rules"]:
        assert rule["annotations"]["runbook"] and rule["annotations"]["summary"], rule


async def traffic(url: str, key: str, limited: str) -> None:
    """A request of every kind the panels show: plain, streamed, refused, cut by the client, an upstream error."""
    auth = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s:
        for body in (CHAT, {**CHAT, "stream": True}):
            async with s.post(url + "/v1/chat/completions", json=body, headers=auth) as r:
                assert r.status == 200
                await r.read()
        for _ in range(2):
            async with s.post(url + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {limited}"}):
                pass
        hang = {**auth, "x-fake-script": '{"hang_after": 1}'}
        async with s.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=hang) as r:
            await r.content.readany()
        async with s.post(
            url + "/v1/chat/completions", json=CHAT, headers={**auth, "x-fake-script": '{"status": 500}'}
        ):
            pass


async def test_every_dashboard_query_and_alert_works_against_a_real_prometheus(fake, sidecar_factory, helm, tmp_path):
    groups = rules(helm)
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": groups}))
    running = await sidecar_factory(
        fake.url,
        auth__enabled=True,
        server__admin_token=ADMIN,
        audit__capture="all",
        audit__sinks=("jsonl",),
    )
    async with aiohttp.ClientSession() as s:
        budget = {"budget_tokens": 10**9, "budget_period": "day"}  # its figures: the budget alerts' series
        _, created, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "panel", **budget})
        _, limited, _ = await admin(s, "POST", running.url + "/admin/keys", {"name": "one", "rpm": 1})
        async with s.get(running.url + "/metrics") as r:  # the first scrape asks the upstream for its models
            assert r.status == 200
    prom = Prometheus(tmp_path, f"127.0.0.1:{running.port}", rule_file)
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 30
            while True:  # up, and both targets scraped at least once
                try:
                    up = await prom.api(s, "/api/v1/query", query="up")
                    if len(up["result"]) == 2 and all(r["value"][1] == "1" for r in up["result"]):
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "Prometheus did not scrape both targets"
                await asyncio.sleep(0.25)
            for _ in range(3):  # traffic over a few scrapes, so rates have two samples or more
                await traffic(running.url, created["key"], limited["key"])
                await asyncio.sleep(1.2)
            await asyncio.sleep(2.5)
            names = set(await prom.api(s, "/api/v1/label/__name__/values"))
            results = {}
            for row, title, expr in dashboard_queries():
                query = expr.replace("$__rate_interval", "15s").replace("$job", ".*").replace("$pod", ".*")
                for metric in re.findall(r"\b((?:sidecar_|vllm:)[a-z_:]+)\b", query):
                    assert metric in names, f"{title}: {metric} is not a series the sidecar or vLLM exports"
                data = await prom.api(s, "/api/v1/query", query=query)
                results[(row, title, expr)] = data["result"]
            empty = [key[1] for key, result in results.items() if not result]
            assert not empty, f"panels without data: {empty}"
            for group in groups:
                for rule in group["rules"]:
                    for metric in re.findall(r"\b((?:sidecar_|vllm:)[a-z_:]+)\b", rule["expr"]):
                        assert metric in names, f"{rule['alert']}: {metric} is not exported"
            evaluated = await prom.api(s, "/api/v1/rules")
            health = {r["name"]: (r["health"], r.get("lastError", "")) for g in evaluated["groups"] for r in g["rules"]}
            assert len(health) == 9 and all(h == "ok" for h, _ in health.values()), health
    finally:
        prom.close()
    print(f"\n{len(results)} dashboard queries and {len(health)} alerts evaluated against Prometheus: all with data")
