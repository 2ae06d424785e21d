"""Ops: what an operator watches and the run state the probes report. `health` (`/healthz`, `/readyz`,
`/drain`), `metrics` over `series` (`/metrics`), `upstream_page` (the upstream's own metrics page at
`/metrics/upstream`, and its model list for the `model` label), `tracing` (OpenTelemetry spans, loaded only
when on), `logs` (the process log and the request log), `rejects` (what an unauthenticated reject costs),
`state` (the run state the drain sets), `workers` (the parent of `server.workers` processes on one port) and
`peers` (worker 0's operations port speaking for the others).
Every module is its face.
"""

__all__ = [
    "health", "logs", "metrics", "peers", "rejects", "series", "state", "tracing", "upstream_page", "workers",
]  # fmt: skip
