#!/usr/bin/env python3
"""Writes the chart's Grafana dashboard (helm/sidecar/files/dashboard.json) from the panel list below.

    python3 scripts/dashboard.py          # write it
    python3 scripts/dashboard.py --check  # exit 1 when the file differs (tests/test_observability.py runs this)

Each panel is (title, unit, [(PromQL, legend)]); `vllm` panels read the model server's own series, which the
sidecar relays at /metrics/upstream on its ops port. The queries use `$__rate_interval` and the `$job`/`$pod`
variables; tests/test_observability.py evaluates every one of them against a real Prometheus scraping a real
sidecar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "helm" / "sidecar" / "files" / "dashboard.json"
SEL = 'job=~"$job", pod=~"$pod"'
R = "$__rate_interval"


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{R}])))"


Panel = tuple[str, str, list[tuple[str, str]]]
ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic",
        [
            (
                "Requests by route and outcome",
                "reqps",
                [(f"sum by (route, outcome) (rate(sidecar_requests_total{{{SEL}}}[{R}]))", "{{route}} {{outcome}}")],
            ),
            (
                "Refused by a limit (429/503), by reason",
                "reqps",
                [(f"sum by (reason) (rate(sidecar_rate_limited_total{{{SEL}}}[{R}]))", "{{reason}}")],
            ),
            (
                "Upstream errors by reason",
                "reqps",
                [(f"sum by (reason) (rate(sidecar_upstream_errors_total{{{SEL}}}[{R}]))", "{{reason}}")],
            ),
            (
                "Client disconnects",
                "reqps",
                [(f"sum by (route) (rate(sidecar_client_disconnects_total{{{SEL}}}[{R}]))", "{{route}}")],
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Time to first token",
                "s",
                [(q(p, "sidecar_time_to_first_token_seconds"), f"p{round(p * 100)}") for p in (0.5, 0.9, 0.99)],
            ),
            (
                "Request duration",
                "s",
                [(q(p, "sidecar_request_duration_seconds"), f"p{round(p * 100)}") for p in (0.5, 0.9, 0.99)],
            ),
            (
                "The sidecar's own time (overhead)",
                "s",
                [(q(p, "sidecar_overhead_seconds"), f"p{round(p * 100)}") for p in (0.5, 0.9, 0.99)],
            ),
            (
                "Lease wait (queued for a slot)",
                "s",
                [(q(p, "sidecar_lease_wait_seconds"), f"p{round(p * 100)}") for p in (0.5, 0.99)],
            ),
        ],
    ),
    (
        "Tokens",
        [
            (
                "Tokens per second by model",
                "short",
                [(f"sum by (model, kind) (rate(sidecar_tokens_total{{{SEL}}}[{R}]))", "{{model}} {{kind}}")],
            ),
            (
                "Tokens per second, top 10 keys",
                "short",
                [(f"topk(10, sum by (key_id) (rate(sidecar_key_tokens_total{{{SEL}}}[{R}])))", "{{key_id}}")],
            ),
        ],
    ),
    (
        "Capacity",
        [
            (
                "In flight and queued",
                "short",
                [
                    (f"sum(sidecar_in_flight_requests{{{SEL}}})", "in flight"),
                    (f"sum(sidecar_lease_queue_depth{{{SEL}}})", "queued for a slot"),
                    (f"sum(sidecar_upstream_slots_active{{{SEL}}})", "upstream slots held"),
                ],
            ),
            (
                "Upstream connections",
                "short",
                [(f"sum by (state) (sidecar_upstream_connections{{{SEL}}})", "{{state}}")],
            ),
        ],
    ),
    (
        "Fairness (the dispatch queue at limits.global_concurrency)",
        [
            (
                "Queue depth by priority class",
                "short",
                [(f"sum by (priority) (sidecar_lease_queue_depth{{{SEL}}})", "{{priority}}")],
            ),
            (
                "Queue wait by priority class",
                "s",
                [
                    (q(p, "sidecar_queue_wait_seconds", "priority"), f"{{{{priority}}}} p{round(p * 100)}")
                    for p in (0.5, 0.99)
                ],
            ),
            (
                "Refused by the queue, by reason",
                "reqps",
                [
                    (
                        f"sum by (reason) (rate(sidecar_rate_limited_total{{{SEL}, "
                        f'reason=~"queue_full|queue_shed|queue_timeout|overloaded"}}[{R}]))',
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Share of tokens served, top 10 keys",
                "percentunit",
                [
                    (
                        f"topk(10, sum by (key_id) (rate(sidecar_key_tokens_total{{{SEL}}}[{R}])) / "
                        f"scalar(sum(rate(sidecar_key_tokens_total{{{SEL}}}[{R}]))))",
                        "{{key_id}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Records, store and audit",
        [
            (
                "Writer queue and spool",
                "short",
                [
                    (f"sum(sidecar_writer_queue_depth{{{SEL}}})", "queued rows"),
                    (f"sum(sidecar_writer_held_rows{{{SEL}}})", "held rows"),
                    (f"sum(sidecar_writer_spool_bytes{{{SEL}}})", "spool bytes"),
                ],
            ),
            (
                "Writer: mean time per flush",
                "s",
                [
                    (
                        f"sum by (table) (rate(sidecar_writer_flush_seconds_total{{{SEL}}}[{R}])) / "
                        f"sum by (table) (rate(sidecar_writer_flushes_total{{{SEL}}}[{R}]))",
                        "{{table}}",
                    )
                ],
            ),
            (
                "Store errors and reachability",
                "short",
                [
                    (f"sum(rate(sidecar_writer_store_errors_total{{{SEL}}}[{R}]))", "store errors/s"),
                    (f"min(sidecar_writer_store_up{{{SEL}}})", "store up"),
                ],
            ),
            (
                "Audit records dropped",
                "short",
                [(f"sum(rate(sidecar_audit_dropped_total{{{SEL}}}[{R}]))", "dropped/s")],
            ),
        ],
    ),
    (
        "vLLM (the model server, through /metrics/upstream)",
        [
            (
                "vLLM requests running and waiting",
                "short",
                [
                    (f"sum(vllm:num_requests_running{{{SEL}}})", "running"),
                    (f"sum(vllm:num_requests_waiting{{{SEL}}})", "waiting"),
                ],
            ),
            ("vLLM KV cache usage", "percentunit", [(f"max(vllm:kv_cache_usage_perc{{{SEL}}})", "KV cache")]),
            (
                "vLLM tokens per second",
                "short",
                [
                    (f"sum(rate(vllm:prompt_tokens_total{{{SEL}}}[{R}]))", "prompt"),
                    (f"sum(rate(vllm:generation_tokens_total{{{SEL}}}[{R}]))", "generation"),
                ],
            ),
            ("vLLM time to first token", "s", [(q(0.99, "vllm:time_to_first_token_seconds"), "p99")]),
        ],
    ),
]


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    y = 0
    pid = 1
    for row, members in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False, "gridPos": _pos(0, y, 24, 1)})
        pid += 1
        y += 1
        for i, (title, unit, targets) in enumerate(members):
            panels.append(
                {
                    "type": "timeseries",
                    "title": title,
                    "id": pid,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": _pos((i % 2) * 12, y + (i // 2) * 8, 12, 8),
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {"refId": chr(65 + n), "expr": expr, "legendFormat": legend}
                        for n, (expr, legend) in enumerate(targets)
                    ],
                }
            )
            pid += 1
        y += ((len(members) + 1) // 2) * 8
    variables = [
        {"type": "datasource", "name": "datasource", "query": "prometheus", "label": "Data source"},
        _query_var("job", "label_values(sidecar_build_info, job)"),
        _query_var("pod", 'label_values(sidecar_build_info{job=~"$job"}, pod)'),
    ]
    return {
        "title": "sidecar",
        "uid": "sidecar-overview",
        "tags": ["sidecar", "llm", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "panels": panels,
    }


def _pos(x: int, y: int, w: int, h: int) -> dict[str, int]:
    return {"x": x, "y": y, "w": w, "h": h}


def _query_var(name: str, query: str) -> dict[str, object]:
    return {
        "type": "query",
        "name": name,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def text() -> str:
    return json.dumps(dashboard(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == text() else 1)
    OUT.write_text(text())
