"""Prometheus for the tests: its tools (`tool`: Debian's `prometheus` package, with promtool), the chart's rules
as rendered (`rules`) and a real server scraping a sidecar as the chart's ServiceMonitor does (`Prometheus`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.helm import PEPPER, render_values
from tests.support.processes import terminate
from tests.support.waits import free_port

RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
JOB = "t-sidecar-ops"  # what the ServiceMonitor's scrape names the job: the -ops Service of release "t"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing = f"{name} not installed (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    return path


def rules(helm_bin: str, **rule_values: object) -> list[dict]:
    values = {"secrets": {"pepper": PEPPER}, "prometheusRule": {"enabled": True, **rule_values}}
    docs = render_values(helm_bin, values, "--api-versions", RULE_API)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule["spec"]["groups"]


class Prometheus:
    def __init__(self, tmp_path: Path, target: str, rule_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        scrape = {"scrape_interval": "1s", "scrape_timeout": "900ms"}
        config = {
            "global": {"evaluation_interval": "1s", **scrape},
            "rule_files": [str(rule_file)],
            "scrape_configs": [
                {"job_name": JOB, "metrics_path": path, "static_configs": [{"targets": [target]}], **scrape}
                for path in ("/metrics", "/metrics/upstream")
            ],
        }
        # As the ServiceMonitor's second endpoint: the same job, told apart by `source` (else `up` would clash).
        config["scrape_configs"][1]["job_name"] = JOB + "-upstream"
        config["scrape_configs"][1]["relabel_configs"] = [
            {"target_label": "job", "replacement": JOB},
            {"target_label": "source", "replacement": "upstream"},
        ]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> dict:
        async with session.get(self.url + path, params=params) as r:
            body = await r.json()
            assert body["status"] == "success", body
            return body["data"]

    def close(self) -> None:
        terminate(self.proc)
