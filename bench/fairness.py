#!/usr/bin/env python3
"""Many keys, one engine (#29), measured: the dispatch queue's `fifo` and `fair` orders in one run.

    .venv/bin/python bench/fairness.py                     # about 1.5 minutes
    .venv/bin/python bench/fairness.py --duration 4 --out /tmp/fairness.md

The fake engine of the tests (tests/support/engine.py: `--capacity` requests at once, `--token-ms` per output
token, its own first-come queue for the rest, as vLLM's scheduler) runs in this process, so its record of what it
ran when gives the utilisation. For each order a fresh `sidecar serve` (auth on, keys made through the admin API,
`limits.global_concurrency` = the engine's capacity, a queue of 1024 with a 120 s timeout) fronts it, and three
phases run one after another, each `--duration` seconds measured after a one-second warm-up:

1. **alone**: the light key sends one request at a time (closed loop): its latency is the service time.
2. **beside heavy**: the same light key beside a heavy key holding `--heavy` requests in flight at all times. The
   light key's p50/p99 against alone; the engine's utilisation over the window (the share of capacity x time it
   ran requests).
3. **unequal demand**: three keys of equal weight holding 2, 8 and 24 requests in flight. Jain's fairness index
   of the tokens the engine served them in the window, (sum x)^2 / (n sum x^2): 1 when equal.

The light key's requests ask for `--max-tokens` output tokens, the others' vary by `--jitter` either way (real
requests differ in length; all alike, the engine's slots run in lockstep and a light request that just missed a
batch waits a whole service time: `--jitter 0` shows it); non-streamed; latencies are measured by the client from
send to the whole answer. Also the sidecar's CPU (utime + stime from /proc) per request in phase 2. Prints a
markdown summary and writes it to `--out` (default bench-results/fairness-STAMP.md).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench.run import Target, free_port, log, tree_cpu  # noqa: E402
from tests.support.engine import Engine, start  # noqa: E402

ADMIN = secrets.token_urlsafe(24)


def sidecar(name: str, engine_url: str, work: Path, order: str, capacity: int, binary: list[str]) -> Target:
    data = work / name
    data.mkdir()
    env = {
        "PYTHONPATH": str(ROOT),  # the tree this script is in (with `-m sidecar`, run from the data dir)
        "SIDECAR_SERVER_DATA_DIR": str(data),
        "SIDECAR_STORE_URL": f"sqlite:///{data}/sidecar.db",
        "SIDECAR_SERVER_ADMIN_TOKEN": ADMIN,
        "SIDECAR_AUTH_PEPPER": secrets.token_hex(32),
        "SIDECAR_AUTH_ENABLED": "true",
        "SIDECAR_LIMITS_GLOBAL_CONCURRENCY": str(capacity),
        "SIDECAR_LIMITS_QUEUE_SIZE": "1024",
        "SIDECAR_LIMITS_QUEUE_TIMEOUT": "120",
        "SIDECAR_LIMITS_QUEUE_ORDER": order,
    }
    port = free_port()
    cmd = [*binary, "serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", engine_url + "/v1"]
    return Target(name, port, f"queue_order={order}", cmd, env)


async def new_key(s: aiohttp.ClientSession, url: str, name: str) -> str:
    headers = {"authorization": f"Bearer {ADMIN}"}
    async with s.post(url + "/admin/keys", json={"name": name}, headers=headers) as r:
        doc = await r.json()
        assert r.status == 201, doc
        return str(doc["key"])


class Load:
    """Closed-loop clients of one key: `streams` requests in flight until `stop`; each names the key in `user` (the
    engine records it) and its latency is kept with when it was sent."""

    def __init__(self, url: str, key: str, user: str, streams: int, max_tokens: int, jitter: float = 0.0) -> None:
        self.url, self.key, self.user, self.streams = url, key, user, streams
        self.body = {"model": "engine-model", "messages": [{"role": "user", "content": "hi"}], "user": user}
        self.sizes = (max(1, round(max_tokens * (1 - jitter))), round(max_tokens * (1 + jitter)))
        self.done: list[tuple[float, float, int]] = []  # (sent, seconds, status)

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as s:
            await asyncio.gather(*(self._one(s, stop) for _ in range(self.streams)))

    async def _one(self, s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        while not stop.is_set():
            body = {**self.body, "max_tokens": random.randint(*self.sizes)}
            sent = time.monotonic()
            async with s.post(self.url + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
            self.done.append((sent, time.monotonic() - sent, r.status))

    def latencies(self, since: float, until: float) -> list[float]:
        return sorted(t for sent, t, status in self.done if since <= sent < until and status == 200)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else float("nan")


async def phase(engine: Engine, loads: list[Load], warmup: float, duration: float, pid: int) -> dict[str, Any]:
    """Run `loads` together; measure over `duration` after `warmup`, then stop them and let them finish."""
    while engine.running or engine.waiting:
        await asyncio.sleep(0.05)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(load.run(stop)) for load in loads]
    await asyncio.sleep(warmup)
    since, cpu0 = time.monotonic(), tree_cpu(pid)
    await asyncio.sleep(duration)
    until, cpu1 = time.monotonic(), tree_cpu(pid)
    stop.set()
    await asyncio.gather(*tasks)
    served = {load.user: 0 for load in loads}
    for r in engine.served:
        if since <= r.started < until and r.user in served:
            served[r.user] += r.tokens
    requests = sum(1 for load in loads for sent, _, _ in load.done if since <= sent < until)
    failed = sum(1 for load in loads for _, _, status in load.done if status != 200)
    return {
        "utilisation": engine.utilisation(since, until),
        "served_tokens": served,
        "latency": {load.user: load.latencies(since, until) for load in loads},
        "cpu_us_per_request": (cpu1 - cpu0) * 1e6 / requests if requests else float("nan"),
        "requests": requests,
        "failed": failed,
    }


async def one_order(order: str, engine: Engine, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    target = sidecar(f"sidecar-{order}", engine.url, work, order, a.capacity, a.sidecar.split())
    target.start(work)
    try:
        await asyncio.to_thread(target.wait, "/healthz")  # the engine answers on this loop meanwhile
        assert target.proc is not None
        url, pid = target.url, target.proc.pid
        async with aiohttp.ClientSession() as s:
            keys = {name: await new_key(s, url, name) for name in ("light", "heavy", "d2", "d8", "d24")}

        def load(name: str, streams: int) -> Load:
            return Load(url, keys[name], name, streams, a.max_tokens, 0.0 if name == "light" else a.jitter)

        log(f"{order}: light key alone")
        alone = await phase(engine, [load("light", 1)], a.warmup, a.duration, pid)
        log(f"{order}: light key beside {a.heavy} heavy streams")
        beside = await phase(engine, [load("light", 1), load("heavy", a.heavy)], a.warmup, a.duration, pid)
        log(f"{order}: keys of demand 2, 8, 24")
        unequal = await phase(engine, [load("d2", 2), load("d8", 8), load("d24", 24)], a.warmup, a.duration, pid)
    finally:
        await asyncio.to_thread(target.stop)
    return {"alone": alone, "beside": beside, "unequal": unequal}


def render(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    service = meta["max_tokens"] * meta["token_ms"] / 1000
    out = [
        f"# Fairness benchmark ({meta['started']})",
        "",
        f"`{meta['command']}`",
        "",
        f"Engine: tests/support/engine.py in the bench's process, capacity {meta['capacity']}, {meta['token_ms']} ms "
        f"per output token; the light key's requests ask for {meta['max_tokens']} output tokens (service time "
        f"{service:.3f} s), the other keys' for {meta['max_tokens']} ± {meta['jitter']:.0%}. Sidecar: "
        f"`sidecar serve`, auth on, `limits.global_concurrency = {meta['capacity']}`, queue 1024. Each phase "
        f"{meta['duration']} s measured after {meta['warmup']} s. Machine: {meta['machine']}; load average "
        f"{meta['load']} at the start.",
        "",
        "| order | light alone p50 / p99 s | light beside heavy p50 / p99 s | p50 / service time | utilisation "
        "(beside heavy) | Jain (2, 8, 24 streams) | tokens served 2 / 8 / 24 | sidecar CPU µs/req (beside heavy) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for order, r in results.items():
        alone, beside, unequal = r["alone"]["latency"]["light"], r["beside"]["latency"]["light"], r["unequal"]
        tokens = [unequal["served_tokens"][k] for k in ("d2", "d8", "d24")]
        out.append(
            f"| {order} | {pct(alone, 0.5):.3f} / {pct(alone, 0.99):.3f} (n={len(alone)}) | "
            f"{pct(beside, 0.5):.3f} / {pct(beside, 0.99):.3f} (n={len(beside)}) | "
            f"{pct(beside, 0.5) / service:.2f}x | {r['beside']['utilisation']:.1%} | {jain(tokens):.3f} | "
            f"{' / '.join(map(str, tokens))} | {r['beside']['cpu_us_per_request']:.0f} |"
        )
    failed = {o: sum(r[p]["failed"] for p in r) for o, r in results.items()}
    out += [
        "",
        "Utilisation in the unequal-demand phase: "
        + ", ".join(f"{o} {r['unequal']['utilisation']:.1%}" for o, r in results.items())
        + f". Requests that did not answer 200: {failed}.",
        "",
    ]
    return "\n".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=4, help="requests the engine runs at once")
    ap.add_argument("--token-ms", type=float, default=10.0, help="the engine's time per output token")
    ap.add_argument("--max-tokens", type=int, default=20, help="output tokens per request")
    ap.add_argument(
        "--jitter", type=float, default=0.5,
        help="the other keys' output tokens vary by this fraction either way (0: all alike: the engine's slots "
        "then run in lockstep, and a light request that just missed a batch waits a whole service time)",
    )  # fmt: skip
    ap.add_argument("--heavy", type=int, default=24, help="the heavy key's requests in flight")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring, per phase")
    ap.add_argument("--orders", default="fifo,fair")
    ap.add_argument("--sidecar", default=f"{sys.executable} -m sidecar", help="the sidecar command (before `serve`)")
    ap.add_argument("--out", help="write the markdown summary here too (default: bench-results/fairness-STAMP.md)")
    a = ap.parse_args()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    engine = Engine(a.capacity, a.token_ms / 1000.0)
    runner = await start(engine)
    work = Path(tempfile.mkdtemp(prefix="sidecar-fairness-"))
    meta = {
        "started": stamp,
        "command": "python bench/fairness.py " + " ".join(sys.argv[1:]),
        "capacity": a.capacity,
        "token_ms": a.token_ms,
        "max_tokens": a.max_tokens,
        "jitter": a.jitter,
        "duration": a.duration,
        "warmup": a.warmup,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load": f"{os.getloadavg()[0]:.2f}",
    }
    try:
        results = {order: await one_order(order, engine, work, a) for order in a.orders.split(",")}
    finally:
        await runner.cleanup()
    text = render(meta, results)
    print(text)
    out = Path(a.out) if a.out else ROOT / "bench-results" / f"fairness-{stamp}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    raw = {o: {p: {k: v for k, v in r[p].items() if k != "latency"} for p in r} for o, r in results.items()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": raw}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
