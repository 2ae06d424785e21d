"""Proxy CPU per SSE event, paced (issue 30): streams of 64 and of 256 tokens 20 ms apart at 200 connections (a
load the proxy keeps up with), CPU from /proc per event relayed, and the marginal cost of an event: (CPU per
256-token stream - CPU per 64-token stream) / 192, which leaves out what a request costs once (auth, admission,
the row). The floor, nginx and each sidecar variant in turn, rotated per round, as run.py does.

    python3 bench/per_event.py                                                       # floor, nginx, sidecar
    python3 bench/per_event.py --sidecar '.venv/bin/python -m sidecar' \\
        --variant after:PYTHONPATH=. --variant before:PYTHONPATH=/tmp/old-tree      # two trees, one run
    python3 bench/per_event.py --delay-ms 0                                          # unpaced
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # bench/run.py: the targets, the mock, loadgen and the /proc helpers

SIZES = (64, 256)  # tokens a stream; each stream also carries the role/finish, usage and [DONE] events
LIMITS = {"SIDECAR_LIMITS_CONCURRENCY": "2000", "SIDECAR_LIMITS_GLOBAL_CONCURRENCY": "2000"}


def targets(a: argparse.Namespace, mock: R.Target, work: Path) -> list[R.Target]:
    py = str(R.ROOT / ".venv/bin/python")
    port = R.free_port()
    floor = [py, str(R.BENCH / "aiohttp_passthrough.py"), "--upstream", mock.url, "--port", str(port)]
    out = [R.Target("aiohttp", port, "floor", floor, {"PROXY_KEY": R.FLOOR_KEY}, "Bearer " + R.FLOOR_KEY)]
    if not a.no_nginx:
        out.append(R.nginx_target(work, mock.port))
    variants = dict(v.partition(":")[::2] for v in a.variant) or {"sidecar": ""}
    for name, kvs in variants.items():
        env = {**LIMITS, **dict(kv.split("=", 1) for kv in kvs.split(",") if kv)}
        out.append(R.sidecar_target(name, env, mock.url, work, shlex.split(a.sidecar)))
    return out


def measure(a: argparse.Namespace, ts: list[R.Target], mock: R.Target, work: Path) -> dict[tuple[str, int], list]:
    lg = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(lg), str(R.BENCH / "loadgen.c")], check=True)
    R.http("POST", mock.url + "/mock/config", {"chunks": 64, "chunk_delay_ms": a.delay_ms})
    busy = [t.proc.pid for t in [mock, *ts] if t.proc]
    res: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rnd in range(a.rounds):
        for n in SIZES:
            body = work / f"body-{n}.json"
            doc = {**R.chat_body(True), "max_tokens": n}
            body.write_text(json.dumps(doc))
            k = rnd % len(ts)
            for t in ts[k:] + ts[:k]:
                R.settle(busy)
                load, cpu0 = R.loadavg(), R.tree_cpu(t.proc.pid) if t.proc else 0.0
                r = R.run_loadgen(lg, t.url + "/v1/chat/completions", a.conns, a.duration, body, t.auth, True, 1.0)
                cpu = R.tree_cpu(t.proc.pid) - cpu0 if t.proc else 0.0
                us = cpu / max(r["events_total"], 1) * 1e6
                res.setdefault((t.name, n), []).append({"us": us, "ev_s": r["events_per_s"], "load": load})
                rate = r["events_per_s"]
                R.log(f"r{rnd + 1} {n:3d} tokens {t.name:10s} {us:6.2f} µs/event {rate:8.0f} ev/s load {load:.2f}")
    return res


def report(a: argparse.Namespace, ts: list[R.Target], res: dict[tuple[str, int], list]) -> str:
    lines = [
        f"`python3 bench/per_event.py {' '.join(sys.argv[1:])}`: {a.conns} connections, tokens {a.delay_ms:g} ms "
        f"apart, {a.rounds} rounds x {a.duration:g} s, medians (min-max); 1-min load "
        f"{min(x['load'] for v in res.values() for x in v):.2f}-{max(x['load'] for v in res.values() for x in v):.2f}",
        "",
        "| target | µs/event, 64-token streams | µs/event, 256-token streams | marginal µs/event | vs aiohttp |",
        "|---|---:|---:|---:|---:|",
    ]
    med = {key: statistics.median(x["us"] for x in v) for key, v in res.items()}
    marginal = {t.name: (med[t.name, 256] * 258 - med[t.name, 64] * 66) / 192 for t in ts}
    for t in ts:
        cells = []
        for n in SIZES:
            us = [x["us"] for x in res[t.name, n]]
            cells.append(f"{med[t.name, n]:.1f} ({min(us):.1f}-{max(us):.1f})")
        ratio = marginal[t.name] / marginal["aiohttp"]
        lines.append(f"| {t.name} | {cells[0]} | {cells[1]} | {marginal[t.name]:.1f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sidecar", default=str(R.ROOT / ".venv/bin/sidecar"), help="the sidecar command (before `serve`)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V", help="a sidecar (repeatable)")
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidecar-per-event-"))
    port = R.free_port()
    mock = R.Target("mock", port, "mock", [str(R.ROOT / ".venv/bin/python"), str(R.BENCH / "mock_upstream.py")])
    mock.cmd = [*(mock.cmd or []), "--port", str(port)]
    ts = targets(a, mock, work)
    try:
        mock.start(work)
        mock.wait("/health")
        for t in ts:
            t.start(work)
        for t in ts:
            t.wait({"aiohttp": "/", "nginx": "/health"}.get(t.name, "/healthz"))
            if t.name not in ("aiohttp", "nginx"):
                R.create_key(t)
        res = measure(a, ts, mock, work)
    finally:
        for t in [mock, *ts]:
            t.stop()
    print(report(a, ts, res), end="")


if __name__ == "__main__":
    main()
