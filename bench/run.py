"""The repository's side-by-side benchmark: the sidecar beside a bare aiohttp pass-through and no proxy at all.

Everything it runs is in bench/: the mock upstream (mock_upstream.py), the floor (aiohttp_passthrough.py), the
load drivers (wrk with wrk_post.lua for non-streaming runs, loadgen.c, built with gcc, for streams: TTFT). Targets:

    direct         straight to the mock upstream: what the machine can do without a proxy
    aiohttp        the ~60-line aiohttp pass-through: the floor for an aiohttp design (no keys, no records)
    aiohttp-pool   the same with the sidecar's own upstream client (opt-in): aiohttp's server + sidecar.upstream.pool
    nginx          Debian's nginx as a plain reverse proxy (opt-in)
    sidecar        .venv/bin/sidecar serve: a fresh SQLite store in a temp dir, one key with limits never reached
                   (created through the admin API), request records, default settings otherwise
    sidecar-audit  the same with audit capture of everything to JSONL (opt-in: --targets ...,sidecar-audit)

Every target gets the same workloads, interleaved in rotated order over the rounds (drift and position cancel
out); the summary quotes medians and ratios to `direct` and to the `aiohttp` floor. Proxy CPU per request is
utime+stime of the proxy's process tree (/proc/PID/stat) over the run divided by the requests (streams) served:
the least noise-sensitive figure on a shared machine.

    python3 bench/run.py                                   # default: 4 workloads x 3 targets x 3 rounds x 5 s
    python3 bench/run.py --rounds 1 --duration 3 --workloads chat_c16,stream_c16     # a quick look
    python3 bench/run.py --workloads stream_paced_c1000 --rounds 2 --duration 10     # at scale
    python3 bench/run.py --variant 'nolog:SIDECAR_SERVER_ACCESS_LOG=false'           # one more sidecar, env set
    python3 bench/run.py --from-raw bench-results/raw-XXXX.jsonl                      # re-print a summary

SIDECAR_* variables in the environment apply to every sidecar target. Needs .venv (bash scripts/dev.sh install),
wrk and gcc (Debian: apt-get install -y wrk gcc libc6-dev; installed automatically when run as root). Stdlib
only: runs under any python3 >= 3.11 or .venv/bin/python.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
KEY_LIMITS = {"rpm": 100_000_000, "tpm": 100_000_000_000, "concurrency": 100_000}
FLOOR_KEY = "sk-bench-floor-0123456789"
CHUNKS = 64

# name: driver, connections, body, token pacing at the mock (ms), what it shows
WORKLOADS: dict[str, dict[str, Any]] = {
    "chat_c1": dict(stream=False, conns=1, delay_ms=0, desc="non-streaming small chat, 1 connection: added latency"),
    "chat_c16": dict(stream=False, conns=16, delay_ms=0, desc="non-streaming small chat, 16 connections"),
    "chat_c64": dict(stream=False, conns=64, delay_ms=0, desc="non-streaming small chat, 64 connections"),
    "stream_c1": dict(
        stream=True, conns=1, delay_ms=0, desc="SSE, 64 tokens + usage, no pacing, 1 connection: added TTFT"
    ),
    "stream_c16": dict(stream=True, conns=16, delay_ms=0, desc="SSE, 64 tokens + usage, no pacing, 16 connections"),
    "stream_c64": dict(stream=True, conns=64, delay_ms=0, desc="SSE, 64 tokens + usage, no pacing, 64 connections"),
    "stream_paced_c16": dict(stream=True, conns=16, delay_ms=20, desc="SSE, 64 tokens 20 ms apart, 16 connections"),
    "stream_paced_c256": dict(stream=True, conns=256, delay_ms=20, desc="SSE, 64 tokens 20 ms apart, 256 connections"),
    "stream_paced_c1000": dict(
        stream=True, conns=1000, delay_ms=20, desc="SSE, 64 tokens 20 ms apart, 1000 connections"
    ),
}
DEFAULT_WORKLOADS = "chat_c1,chat_c16,stream_c1,stream_c16"
FLOORS = ("aiohttp", "aiohttp-pool")  # pass-throughs with no features: answer any path, take FLOOR_KEY
VARIANTS = {"sidecar": {}, "sidecar-audit": {"SIDECAR_AUDIT_CAPTURE": "all", "SIDECAR_AUDIT_SINKS": "jsonl"}}


def log(*a: object) -> None:
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes, /proc
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                kids.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def tree_cpu(root: int) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat), seconds, summed over the live process tree."""
    ticks = 0
    for p in proc_tree(root):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_mem(root: int) -> dict[str, float]:
    """RSS and peak RSS (VmHWM) in MiB summed over the process tree."""
    rss = hwm = 0
    for p in proc_tree(root):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
        except OSError:
            pass
    return {"rss": round(rss / 1024, 1), "peak": round(hwm / 1024, 1)}


def settle(pids: list[int], max_wait: float = 30.0) -> float:
    """Wait until our processes are idle (a proxy finishing streams the driver abandoned), so one run's tail does
    not steal CPU from the next run. Returns the seconds waited."""
    t0 = time.time()
    prev = sum(tree_cpu(p) for p in pids)
    while time.time() - t0 < max_wait:
        time.sleep(0.25)
        cur = sum(tree_cpu(p) for p in pids)
        if (cur - prev) / 0.25 < 0.03:
            break
        prev = cur
    return time.time() - t0


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def http(
    method: str, url: str, body: Any = None, auth: str = "", timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def chat_body(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "mock", "messages": [{"role": "user", "content": "Hello, how are you?"}]}
    if stream:
        body.update(stream=True, max_tokens=CHUNKS, stream_options={"include_usage": True})
    else:
        body["max_tokens"] = 16
    return body


# ---------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    port: int
    note: str
    cmd: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    auth: str = ""
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # ready_s, smoke, mem: kept in the raw file

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, logdir: Path) -> None:
        if self.cmd:
            out = (logdir / f"{self.name}.log").open("ab")
            self.proc = subprocess.Popen(
                self.cmd,
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=logdir,
            )

    def wait(self, path: str, timeout: float = 60) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (see its log)")
            try:
                http("GET", self.url + path, timeout=2)
                self.info["ready_s"] = round(time.time() - t0, 2)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: process group id == its pid
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def sidecar_target(name: str, env: dict[str, str], upstream: str, work: Path, binary: list[str]) -> Target:
    data = work / name
    data.mkdir()
    port = free_port()
    env = {
        "SIDECAR_SERVER_DATA_DIR": str(data),
        "SIDECAR_STORE_URL": f"sqlite:///{data}/sidecar.db",
        "SIDECAR_SERVER_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "SIDECAR_AUTH_PEPPER": secrets.token_hex(32),  # given, not generated: serve and the CLI agree on it
        **env,
    }
    cmd = [
        *binary,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--upstream",
        upstream + "/v1",
    ]
    extra = ", ".join(
        f"{k}={v}"
        for k, v in env.items()
        if not k.startswith(("SIDECAR_SERVER_", "SIDECAR_STORE_", "SIDECAR_AUTH_PEPPER"))
    )
    return Target(
        name, port, "one key (high limits), leases, SQLite request records" + (f"; {extra}" if extra else ""), cmd, env
    )


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream mock {{ server 127.0.0.1:{upstream}; keepalive 1024; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def nginx_target(work: Path, upstream: int) -> Target:
    """nginx (Debian's, opt-in: `--targets ...,nginx`) as a plain reverse proxy: one worker process (the sidecar's
    one core), keep-alive to the mock, no buffering of answers (SSE events pass as they come), no key check."""
    if not shutil.which("nginx"):
        sys.exit("nginx not found (apt-get install -y nginx-light)")
    d = work / "nginx"
    d.mkdir()
    port = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, upstream=upstream, port=port))
    note = "nginx, 1 worker, proxy_buffering off, keep-alive upstream, no key check"
    return Target("nginx", port, note, ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")])


def create_key(t: Target) -> None:
    """The key, made by the running sidecar's admin API (serve creates the pepper and the store; no CLI step)."""
    ops = t.env.get("SIDECAR_SERVER_OPS_PORT") or os.environ.get("SIDECAR_SERVER_OPS_PORT")
    admin = f"http://127.0.0.1:{ops or t.port}/admin/keys"
    body = {"name": "bench", **KEY_LIMITS}
    for _ in range(100):
        try:
            st, _, raw = http("POST", admin, body, auth="Bearer " + t.env["SIDECAR_SERVER_ADMIN_TOKEN"])
        except OSError:
            st, raw = 0, b""
        if st == 201:
            t.auth = "Bearer " + json.loads(raw)["key"]
            return
        time.sleep(0.2)
    raise RuntimeError(f"{t.name}: POST {admin} answered {st}: {raw[:300]!r}")


def smoke(t: Target) -> dict[str, Any]:
    """What each target answers: models, chat with usage, a whole stream with a usage event, completions,
    embeddings, a wrong key."""
    res: dict[str, Any] = {}
    try:
        st, _, body = http("GET", t.url + "/v1/models", auth=t.auth)
        res["models"] = st == 200 and "data" in json.loads(body)
        st, _, body = http("POST", t.url + "/v1/chat/completions", chat_body(False), auth=t.auth)
        j = json.loads(body) if st == 200 else {}
        res["chat"] = bool(j.get("choices") and j.get("usage", {}).get("total_tokens"))
        st, hdr, body = http("POST", t.url + "/v1/chat/completions", chat_body(True), auth=t.auth)
        events = [ln[5:].strip() for ln in body.decode().split("\n") if ln.startswith("data:")]
        objs = [json.loads(e) for e in events if e != "[DONE]"]
        res["stream"] = st == 200 and "text/event-stream" in hdr.get("content-type", "") and events[-1:] == ["[DONE]"]
        res["tokens"] = sum(1 for o in objs for c in o.get("choices") or [] if (c.get("delta") or {}).get("content"))
        res["events"] = len(events)
        res["usage_event"] = any(o.get("usage") for o in objs)
        st, _, body = http(
            "POST", t.url + "/v1/completions", {"model": "mock", "prompt": "Hi", "max_tokens": 8}, auth=t.auth
        )
        res["completions"] = st == 200 and bool(json.loads(body).get("choices"))
        st, _, body = http("POST", t.url + "/v1/embeddings", {"model": "mock", "input": ["a", "b"]}, auth=t.auth)
        res["embeddings"] = st == 200 and len(json.loads(body).get("data", [])) == 2
        if t.auth:
            res["bad_key"] = http("GET", t.url + "/v1/models", auth="Bearer sk-wrong")[0]
    except Exception as e:  # reported in the smoke table
        res["error"] = repr(e)
    return res


# ---------------------------------------------------------------- drivers
def ensure_tools(need_wrk: bool) -> bool:
    """gcc (loadgen.c) and wrk, from Debian when missing and we are root. Returns whether wrk is there."""
    missing = ([] if shutil.which("gcc") else ["gcc", "libc6-dev"]) + (
        [] if shutil.which("wrk") or not need_wrk else ["wrk"]
    )
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing from Debian:", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False)
    if not shutil.which("gcc"):
        sys.exit("gcc not found: apt-get install -y gcc libc6-dev")
    if need_wrk and not shutil.which("wrk"):
        log("wrk not found (apt-get install -y wrk): non-streaming runs use loadgen instead")
    return bool(shutil.which("wrk"))


def run_wrk(url: str, conns: int, secs: float, body: Path, auth: str) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(secs))}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH / "wrk_post.lua"),
        url,
    ]
    out = subprocess.run(
        cmd,
        env={**os.environ, "BENCH_BODY": str(body), "BENCH_AUTH": auth},
        capture_output=True,
        text=True,
        timeout=secs + 60,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("JSON "):
            j: dict[str, Any] = json.loads(line[5:])
            j["total_ms"] = j.pop("latency_ms")
            j["served"] = j["requests"]
            return j
    raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")


def run_loadgen(
    lg: Path, url: str, conns: int, secs: float, body: Path, auth: str, stream: bool, warm: float
) -> dict[str, Any]:
    cmd = [str(lg), "-c", str(conns), "-d", str(secs), "-w", str(warm), "-T", "60", "-b", str(body)]
    cmd += (["-S"] if stream else []) + (["-H", "Authorization: " + auth] if auth else []) + [url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + warm + 120, check=False)
    j: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    j["served"] = j["requests"] + j["warmup_requests"]
    return j


def drive(
    lg: Path, chat_driver: str, wl: dict[str, Any], url: str, body: Path, auth: str, secs: float, warm: float
) -> dict[str, Any]:
    if not wl["stream"] and chat_driver == "wrk":
        return run_wrk(url, wl["conns"], secs, body, auth)
    return run_loadgen(lg, url, wl["conns"], secs, body, auth, wl["stream"], warm)


# ---------------------------------------------------------------- summary
def med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "-"
    if x != 0 and abs(x) < 0.1:
        return f"{x:.2g}"
    if nd == 0 or abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.{nd}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def aggregate(runs: list[dict[str, Any]], workload: str) -> dict[str, dict[str, Any]]:
    agg: dict[str, dict[str, Any]] = {}
    for r in (r for r in runs if r["workload"] == workload):
        agg.setdefault(r["target"], {"runs": []})["runs"].append(r)
    for a in agg.values():
        rs = a.pop("runs")
        ok = [r for r in rs if r["result"]["requests"] > 0]
        a.update(
            rounds=len(rs),
            rps=med([r["rate"] for r in rs]),
            rps_min=min(r["rate"] for r in rs),
            rps_max=max(r["rate"] for r in rs),
            completed=med([r["result"]["requests"] for r in rs]),
            p50=med([r["result"]["total_ms"]["p50"] for r in ok]),
            p99=med([r["result"]["total_ms"]["p99"] for r in ok]),
            ttft50=med([r["result"]["ttfb_ms"]["p50"] for r in ok if r["result"].get("ttfb_samples")]),
            ttft99=med([r["result"]["ttfb_ms"]["p99"] for r in ok if r["result"].get("ttfb_samples")]),
            cpu=med([r.get("cpu_us") for r in rs]),
            events=med([r["result"].get("events_per_response") for r in ok]),
            errors=sum(sum(r["result"]["errors"].values()) for r in rs),
            load=med([r["load"] for r in rs]),
        )
    return agg


def render(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    targets, workloads = meta["targets"], meta["workloads"]
    loads = [r["load"] for r in runs]
    out = [
        f"# Sidecar benchmark {meta['started']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Machine and versions:",
        "",
    ]
    out += [f"- {k}: {v}" for k, v in meta["versions"].items()]
    if loads:
        out.append(
            f"- 1-min load average before each run (includes this harness's previous run): min {min(loads):.2f} / "
            f"median {statistics.median(loads):.2f} / max {max(loads):.2f}; at start {meta['load_at_start']:.2f}"
        )
    out += ["", "Targets:", ""] + [f"- {t['name']}: {t['note']}" for t in targets]
    out += [
        "",
        f"Runs: {len(runs)} ({meta['rounds']} rounds x {meta['duration']} s per workload and target, "
        "targets rotated per round). The load driver, the proxy and the mock share the machine's cores: absolute "
        "figures are machine-bound, compare the ratios. CPU is the proxy process's utime+stime per request "
        "(per stream).",
        "",
    ]
    aggs = {w: aggregate(runs, w) for w in workloads}
    names = [t["name"] for t in targets]

    def cell(w: str, n: str, key: str, rel: str | None = None, sub: bool = False, nd: int = 2) -> str:
        a, b = aggs.get(w, {}).get(n), aggs.get(w, {}).get(rel or "direct")
        if not a:
            return "-"
        if sub:
            return fmt(diff(a[key], b and b[key]), nd)
        return fmt(ratio(a[key], b and b[key]), nd) if rel else fmt(a[key], nd)

    out += ["### Headline (medians; ratios are target / reference)", ""]
    out.append(
        "| target | chat c16 req/s | vs direct | vs aiohttp | chat c16 CPU µs/req | CPU vs aiohttp | stream c16 "
        "streams/s | vs direct | vs aiohttp | stream c16 CPU µs/stream | CPU vs aiohttp | chat c1 +p50 ms | "
        "stream c1 +TTFT p50 ms | RSS idle MiB | RSS peak MiB |"
    )
    out.append("|---|" + "---:|" * 14)
    for t in targets:
        n, mem = t["name"], t.get("mem", {})
        row = [
            n,
            cell("chat_c16", n, "rps"),
            cell("chat_c16", n, "rps", "direct"),
            cell("chat_c16", n, "rps", "aiohttp"),
            cell("chat_c16", n, "cpu", nd=0),
            cell("chat_c16", n, "cpu", "aiohttp"),
            cell("stream_c16", n, "rps"),
            cell("stream_c16", n, "rps", "direct"),
            cell("stream_c16", n, "rps", "aiohttp"),
            cell("stream_c16", n, "cpu", nd=0),
            cell("stream_c16", n, "cpu", "aiohttp"),
            cell("chat_c1", n, "p50", sub=True),
            cell("stream_c1", n, "ttft50", sub=True),
            fmt(mem.get("idle", {}).get("rss"), 1),
            fmt(mem.get("end", {}).get("peak"), 1),
        ]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    for w in workloads:
        agg, wl = aggs[w], WORKLOADS[w]
        if not agg:
            continue
        d, f = agg.get("direct"), agg.get("aiohttp")
        driver = "loadgen.c" if wl["stream"] or meta.get("chat_driver") == "loadgen" else "wrk"
        rounds = max(a["rounds"] for a in agg.values())
        out += [f"### {w}: {wl['desc']} ({driver}, median of {rounds} rounds)", ""]
        if not wl["stream"]:
            out.append(
                "| target | req/s | (min-max) | vs direct | vs aiohttp | p50 ms | p99 ms | +p50 vs direct ms "
                "| proxy CPU µs/req | CPU vs aiohttp | errors | load |"
            )
            out.append("|---|" + "---:|" * 11)
        else:
            out.append(
                "| target | streams/s | (min-max) | vs direct | vs aiohttp | completed | TTFT p50 ms | TTFT p99 ms "
                "| total p50 ms | total p99 ms | +TTFT p50 vs direct ms | events/stream | proxy CPU µs/stream "
                "| CPU vs aiohttp | errors | load |"
            )
            out.append("|---|" + "---:|" * 15)
        for n in names:
            a = agg.get(n)
            if not a:
                continue
            row = [
                n,
                fmt(a["rps"]),
                f"{fmt(a['rps_min'])}-{fmt(a['rps_max'])}",
                fmt(ratio(a["rps"], d and d["rps"])),
                fmt(ratio(a["rps"], f and f["rps"])),
            ]
            if not wl["stream"]:
                row += [fmt(a["p50"]), fmt(a["p99"]), fmt(diff(a["p50"], d and d["p50"]))]
            else:
                row += [
                    fmt(a["completed"], 0),
                    fmt(a["ttft50"]),
                    fmt(a["ttft99"]),
                    fmt(a["p50"]),
                    fmt(a["p99"]),
                    fmt(diff(a["ttft50"], d and d["ttft50"])),
                    fmt(a["events"], 1),
                ]
            row += [fmt(a["cpu"], 0), fmt(ratio(a["cpu"], f and f["cpu"])), str(a["errors"]), f"{a['load']:.2f}"]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    out += [
        "### Memory (RSS of the proxy process tree, MiB)",
        "",
        "| target | idle (after start + smoke test) | after all runs | peak (VmHWM) |",
        "|---|---:|---:|---:|",
    ]
    for t in targets:
        mem = t.get("mem", {})
        idle, end = mem.get("idle", {}), mem.get("end", {})
        out.append(
            f"| {t['name']} | {fmt(idle.get('rss'), 1)} | {fmt(end.get('rss'), 1)} | {fmt(end.get('peak'), 1)} |"
        )
    out += [
        "",
        "### Smoke tests",
        "",
        "| target | ready s | models | chat | stream | tokens | SSE events | usage event | completions | "
        "embeddings | wrong key → |",
        "|---|---:|---|---|---|---:|---:|---|---|---|---:|",
    ]
    for t in targets:
        s = t.get("smoke", {})
        cols = ["models", "chat", "stream", "tokens", "events", "usage_event", "completions", "embeddings", "bad_key"]
        row = [t["name"], str(t.get("ready_s", "-"))] + [str(s.get(c, "-")) for c in cols]
        out.append("| " + " | ".join(row) + " |" + (f" error: {s['error']}" if s.get("error") else ""))
    return "\n".join(out) + "\n"


def versions(sidecar: str) -> dict[str, str]:
    def sh(cmd: str) -> str:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60, check=False)
        return ((r.stdout + r.stderr).strip().splitlines() or [""])[0]

    py = ROOT / ".venv/bin/python"
    return {
        "kernel": sh("uname -sr"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "cores (nproc)": sh("nproc"),
        "sidecar": f"`{sidecar}`: {sh(sidecar + ' --version')}",
        "repository": f"git {sh(f'git -C {ROOT} rev-parse --short HEAD')}"
        + (" (working tree with uncommitted changes)" if sh(f"git -C {ROOT} status --porcelain") else ""),
        ".venv": sh(
            f"{py} -c \"import sys,aiohttp,uvloop,httptools;print('python',sys.version.split()[0],'aiohttp',"
            "aiohttp.__version__,'uvloop',uvloop.__version__,'httptools',httptools.__version__)\""
        ),
        "wrk": sh("wrk -v") if shutil.which("wrk") else "not installed",
        "gcc": sh("gcc --version"),
    }


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma list of: {', '.join(WORKLOADS)}")
    ap.add_argument(
        "--targets",
        default="direct,aiohttp,sidecar",
        help="comma list of: direct, aiohttp, aiohttp-pool, nginx, sidecar, sidecar-audit",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,K=V",
        help="one more sidecar target with these environment variables (repeatable)",
    )
    ap.add_argument("--sidecar", default=str(ROOT / ".venv/bin/sidecar"), help="the sidecar command (before `serve`)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="discarded warm-up seconds before each run")
    ap.add_argument("--pause", type=float, default=0.5, help="idle seconds between runs")
    ap.add_argument("--chat-driver", choices=("wrk", "loadgen"), help="non-streaming driver (default: wrk if present)")
    ap.add_argument("--out", help="also write the markdown summary here (default: bench-results/run-STAMP.md)")
    ap.add_argument("--from-raw", help="only re-print the summary of an earlier raw-*.jsonl")
    a = ap.parse_args()
    if a.from_raw:
        lines = [json.loads(line) for line in Path(a.from_raw).read_text().splitlines()]
        print(render(lines[-1]["meta"], [r for r in lines if "workload" in r]), end="")
        return
    workloads = [w for w in a.workloads.split(",") if w]
    if bad := [w for w in workloads if w not in WORKLOADS]:
        sys.exit(f"unknown workload {bad}; have {', '.join(WORKLOADS)}")
    names = a.targets.split(",")
    if bad := [n for n in names if n not in ("direct", *FLOORS, "nginx", *VARIANTS)]:
        sys.exit(f"unknown target {bad}; have direct, aiohttp, nginx, {', '.join(VARIANTS)} (or --variant)")
    if not (ROOT / ".venv/bin/python").exists():
        sys.exit("no .venv: run `bash scripts/dev.sh install` first")
    need_wrk = a.chat_driver != "loadgen" and any(not WORKLOADS[w]["stream"] for w in workloads)
    chat_driver = a.chat_driver or ("wrk" if ensure_tools(need_wrk) else "loadgen")
    # 1,000 streams are 2,000+ sockets in the proxy: raise the soft limit for us and our children
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench-results"
    results.mkdir(exist_ok=True)
    raw_path = results / f"raw-{stamp}.jsonl"
    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    lg = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(lg), str(BENCH / "loadgen.c")], check=True)
    py = str(ROOT / ".venv/bin/python")
    port = free_port()
    mock = Target("mock", port, "mock upstream", [py, str(BENCH / "mock_upstream.py"), "--port", str(port)])
    upstream = mock.url

    variants = {n: VARIANTS[n] for n in VARIANTS if n in names}
    for v in a.variant:
        name, _, kvs = v.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in kvs.split(",") if kv)
    targets: list[Target] = []
    if "direct" in names:
        targets.append(Target("direct", mock.port, "straight to the mock upstream, no proxy"))
    if "aiohttp" in names:
        floor = [py, str(BENCH / "aiohttp_passthrough.py"), "--upstream", upstream, "--port"]
        port = free_port()
        note = "bench/aiohttp_passthrough.py: aiohttp + uvloop, one shared ClientSession, bearer check, nothing else"
        targets.append(
            Target("aiohttp", port, note, [*floor, str(port)], {"PROXY_KEY": FLOOR_KEY}, "Bearer " + FLOOR_KEY)
        )
    if "aiohttp-pool" in names:
        floor = [py, str(BENCH / "pool_passthrough.py"), "--upstream", upstream, "--port"]
        port = free_port()
        note = "bench/pool_passthrough.py: the floor with the sidecar's own upstream client (sidecar.upstream.pool)"
        targets.append(
            Target("aiohttp-pool", port, note, [*floor, str(port)], {"PROXY_KEY": FLOOR_KEY}, "Bearer " + FLOOR_KEY)
        )
    if "nginx" in names:
        targets.append(nginx_target(work, mock.port))
    binary = shlex.split(a.sidecar)
    targets += [sidecar_target(n, env, upstream, work, binary) for n, env in variants.items()]
    if not targets:
        sys.exit("no targets")

    command = "python3 bench/run.py " + " ".join(sys.argv[1:])
    meta: dict[str, Any] = {
        "started": stamp,
        "command": command.strip(),
        "workloads": workloads,
        "rounds": a.rounds,
        "duration": a.duration,
        "chat_driver": chat_driver,
        "load_at_start": loadavg(),
        "versions": versions(a.sidecar),
    }
    runs: list[dict[str, Any]] = []
    procs = [mock, *targets]
    ok = False
    try:
        mock.start(work)
        mock.wait("/health")
        for t in targets:
            t.start(work)
        for t in targets:
            if t.cmd:
                t.wait({"aiohttp": "/", "aiohttp-pool": "/", "nginx": "/health"}.get(t.name, "/healthz"))
            if t.name not in ("direct", *FLOORS, "nginx"):
                create_key(t)
            t.info["smoke"] = smoke(t)
            log(f"{t.name} on {t.url}: {t.info['smoke']}")
        bodies = {}
        for kind in (False, True):
            bodies[kind] = work / f"body-{'stream' if kind else 'chat'}.json"
            bodies[kind].write_text(json.dumps(chat_body(kind)))
        time.sleep(1)
        for t in targets:
            if t.proc:
                t.info["mem"] = {"idle": tree_mem(t.proc.pid)}
        busy = [p.proc.pid for p in procs if p.proc]
        total = a.rounds * len(workloads) * len(targets)
        log(f"{total} runs, about {total * (a.duration + a.warmup + a.pause + 1) / 60:.1f} min")
        n = 0
        for rnd in range(a.rounds):
            for wi, w in enumerate(workloads):
                wl = WORKLOADS[w]
                http("POST", upstream + "/mock/config", {"chunks": CHUNKS, "chunk_delay_ms": wl["delay_ms"]})
                k = (rnd + wi) % len(targets)
                for t in targets[k:] + targets[:k]:
                    n += 1
                    url, body = t.url + "/v1/chat/completions", bodies[wl["stream"]]
                    if a.warmup > 0:
                        drive(lg, chat_driver, wl, url, body, t.auth, a.warmup, 0)
                    settle(busy)
                    load = loadavg()
                    cpu0 = tree_cpu(t.proc.pid) if t.proc else 0.0
                    res = drive(lg, chat_driver, wl, url, body, t.auth, a.duration, 0.3)
                    rec: dict[str, Any] = {"round": rnd + 1, "workload": w, "target": t.name, "load": load}
                    if wl["stream"]:
                        # streams served over the whole invocation, partial ones counted by their events
                        per = t.info["smoke"].get("events") or res.get("events_per_response") or 1
                        served, rec["rate"] = res["events_total"] / per, res["events_per_s"] / per
                    else:
                        served, rec["rate"] = res["served"], res["rps"]
                    if t.proc:
                        rec["cpu_us"] = round((tree_cpu(t.proc.pid) - cpu0) / max(served, 1) * 1e6, 1)
                    rec["result"] = res
                    runs.append(rec)
                    with raw_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    ttft = f" ttft50 {res['ttfb_ms']['p50']:.2f} ms" if wl["stream"] else ""
                    log(
                        f"[{n}/{total}] {w:18s} {t.name:14s} {rec['rate']:9.1f}/s p50 {res['total_ms']['p50']:.2f} ms "
                        f"p99 {res['total_ms']['p99']:.2f} ms{ttft} cpu {rec.get('cpu_us', '-')} µs "
                        f"errors {sum(res['errors'].values())} load {load:.2f}"
                    )
                    time.sleep(a.pause)
        for t in targets:
            if t.proc:
                t.info.setdefault("mem", {})["end"] = tree_mem(t.proc.pid)
        ok = True
    finally:
        for p in procs:
            p.stop()
        meta["targets"] = [{"name": t.name, "note": t.note, **t.info} for t in targets]
        with raw_path.open("a") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
        text = render(meta, runs)
        out = Path(a.out) if a.out else results / f"run-{stamp}.md"
        out.write_text(text)
        print(text, end="")
        log(f"wrote {out} and {raw_path}")
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept the logs and stores in {work}")


if __name__ == "__main__":
    main()
