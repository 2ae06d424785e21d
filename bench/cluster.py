#!/usr/bin/env python3
"""Limits across replicas (#17), measured: three `sidecar serve` on one PostgreSQL against SQLite.

    .venv/bin/python bench/cluster.py                      # about 3 minutes on 2 cores
    .venv/bin/python bench/cluster.py --rounds 1 --duration 5

It starts the mock upstream (bench/mock_upstream.py), a throwaway PostgreSQL with pg_stat_statements (Debian's
binaries, as the tests do: tests/support/postgres.py), and three setups, each with one key whose every limit is
set (rpm, tpm, concurrency, a daily token budget) and far from reached: one sidecar on SQLite; three on SQLite, each
its own store and key (nothing shared: what three processes on this machine cost); three on the PostgreSQL. Then:

1. **Cost**, rounds alternating: `--conns` closed-loop connections of non-streaming chat (bench/loadgen.c) at
   each setup in turn, split over its replicas. CPU seconds per request of the sidecar processes (utime + stime
   from /proc), and of PostgreSQL; the ratios to the one SQLite replica.
2. **Statements**: pg_stat_statements is reset before each cluster run; afterwards, calls of statements on the
   limit tables (`limit_balances`, `limit_slots`, `limit_holders`; not the rows' insert, which charges budgets
   in the same statement) per request, and of all statements (the request rows too).
3. **Overshoot**: a new key with `rpm`, one with `tpm` and one with a token budget, each low enough that the
   load runs into it; accepted requests (rows with status 200) and tokens used against what the limit allows
   (the bucket + its refill over the run, or the budget), and the early-refusal bound of README's section.

Prints a markdown summary and writes it to bench-results/cluster-STAMP.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.run import (  # noqa: E402
    BENCH,
    Target,
    chat_body,
    ensure_tools,
    free_port,
    http,
    log,
    run_loadgen,
    settle,
    tree_cpu,
)
from tests.support.postgres import PgServer, find_bin  # noqa: E402

HIGH = {
    "rpm": 100_000_000,
    "tpm": 100_000_000_000,
    "concurrency": 100_000,
    "budget_tokens": 10**15,
    "budget_period": "day",
}
ADMIN = secrets.token_urlsafe(24)
PEPPER = secrets.token_hex(32)


def sidecar(name: str, work: Path, upstream: str, store: str) -> Target:
    data = work / name
    data.mkdir()
    port = free_port()
    env = {
        "SIDECAR_SERVER_DATA_DIR": str(data),
        "SIDECAR_STORE_URL": store or f"sqlite:///{data}/sidecar.db",
        "SIDECAR_SERVER_ADMIN_TOKEN": ADMIN,
        "SIDECAR_AUTH_PEPPER": PEPPER,
    }
    cmd = [str(ROOT / ".venv/bin/sidecar"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Target(name, port, store or "sqlite", [*cmd, "--upstream", upstream + "/v1"], env)


def make_key(t: Target, **limits: Any) -> tuple[str, str]:
    st, _, raw = http("POST", t.url + "/admin/keys", {"name": "bench", **limits}, "Bearer " + ADMIN)
    if st != 201:
        raise RuntimeError(f"POST /admin/keys answered {st}: {raw[:300]!r}")
    body = json.loads(raw)
    return "Bearer " + body["key"], body["id"]


def load(lg: Path, urls: list[str], conns: int, secs: float, body: Path, auths: list[str]) -> list[dict[str, Any]]:
    """`conns` connections split over `urls` (with `auths[i]` at `urls[i]`), one loadgen each, all at once."""
    shares = [conns // len(urls) + (i < conns % len(urls)) for i in range(len(urls))]
    out: list[dict[str, Any]] = [{} for _ in urls]

    def one(i: int) -> None:
        out[i] = run_loadgen(lg, urls[i] + "/v1/chat/completions", shares[i], secs, body, auths[i], False, 0.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(urls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def limit_calls(pg: str) -> tuple[int, int]:
    """(calls of statements on the limit tables, calls of all statements) since the last reset."""
    with psycopg.connect(pg) as conn:
        rows = conn.execute("SELECT query, calls FROM pg_stat_statements").fetchall()
    # The rows' insert charges the budgets in the same statement: a row's statement, not a limit's.
    limit = ("limit_balances", "limit_slots", "limit_holders")
    limits = sum(c for q, c in rows if any(t in q for t in limit) and "INSERT INTO request_log" not in q)
    everything = sum(c for q, c in rows if "pg_stat_statements" not in q)
    return limits, everything


def reset_statements(pg: str) -> None:
    with psycopg.connect(pg) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def postmaster(server: PgServer) -> int:
    return int(Path(server.data, "postmaster.pid").read_text().split()[0])


@dataclass
class Setup:
    name: str
    targets: list[Target]
    auths: list[str] = field(default_factory=list)  # the key to send to each target
    pg: PgServer | None = None


def cost_run(lg: Path, setup: Setup, everyone: list[int], a: Any, body: Path) -> dict[str, Any]:
    """One load run on a setup: requests, CPU seconds of its sidecars (and of PostgreSQL), statements."""
    settle(everyone)
    pids = [t.proc.pid for t in setup.targets if t.proc]
    if setup.pg is not None:
        reset_statements(setup.pg.dsn())
        pg0 = tree_cpu(postmaster(setup.pg))
    cpu0 = sum(tree_cpu(p) for p in pids)
    runs = load(lg, [t.url for t in setup.targets], a.conns, a.duration, body, setup.auths)
    res = {
        "requests": sum(r["requests"] for r in runs),
        "cpu": sum(tree_cpu(p) for p in pids) - cpu0,
        "non2xx": sum(r["errors"]["non2xx"] for r in runs),
    }
    if setup.pg is not None:
        res["pg_cpu"] = tree_cpu(postmaster(setup.pg)) - pg0
        res["limit_statements"], res["all_statements"] = limit_calls(setup.pg.dsn())
    return res


def accepted(pg: str, kid: str) -> tuple[int, int]:
    with psycopg.connect(pg) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FILTER (WHERE status = 200), COALESCE(SUM(total_tokens), 0) FROM request_log "
            "WHERE key_id = %s",
            (kid,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def overshoot(
    lg: Path, cluster: list[Target], pg: PgServer, a: Any, body: Path, per_request: int
) -> list[dict[str, Any]]:
    """One key per limit, low enough for the load to run into it; what was admitted against what it allows."""
    urls = [t.url for t in cluster]
    rpm = 3000
    tpm = rpm * per_request
    budget = 2 * tpm
    cases = [("rpm", {"rpm": rpm}), ("tpm", {"tpm": tpm}), ("budget", {"budget_tokens": budget, "budget_period": "1h"})]
    out = []
    for name, limits in cases:
        auth, kid = make_key(cluster[0], **limits)
        began = time.monotonic()
        load(lg, urls, a.conns, a.duration, body, [auth] * len(urls))
        took = time.monotonic() - began
        time.sleep(1.0)  # the last rows land
        n, tokens = accepted(pg.dsn(), kid)
        if name == "rpm":
            allowed, got, unit = rpm + rpm / 60 * took, n, "requests"
        elif name == "tpm":
            allowed, got, unit = tpm + tpm / 60 * took, tokens, "tokens"
        else:
            allowed, got, unit = budget, tokens, "tokens"
        out.append(
            {
                "limit": f"{name} = {limits.get(name, limits.get('budget_tokens'))}",
                "seconds": round(took, 1),
                "allowed": int(allowed),
                "got": got,
                "unit": unit,
                "over": got - int(allowed),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    ap.add_argument("--conns", type=int, default=16, help="connections, split over the replicas")
    ap.add_argument("--replicas", type=int, default=3, help="sidecars on the PostgreSQL")
    ap.add_argument("--out", help="also write the summary here (default: bench-results/cluster-STAMP.md)")
    a = ap.parse_args()
    ensure_tools(False)
    bindir = find_bin()
    if bindir is None:
        sys.exit("PostgreSQL not found: apt-get install -y postgresql")
    work = Path(tempfile.mkdtemp(prefix="sidecar-cluster-bench-"))
    lg = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(lg), str(BENCH / "loadgen.c")], check=True)
    body = work / "chat.json"
    body.write_text(json.dumps(chat_body(False)))
    py = str(ROOT / ".venv/bin/python")
    port = free_port()
    mock = Target("mock", port, "mock upstream", [py, str(BENCH / "mock_upstream.py"), "--port", str(port)])
    pg = PgServer(bindir, "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all")
    pg.init()
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
    n = a.replicas
    setups = [
        Setup("SQLite, 1 replica", [sidecar("sqlite", work, mock.url, "")]),
        Setup(f"SQLite, {n} replicas each alone", [sidecar(f"sqlite{i}", work, mock.url, "") for i in range(n)]),
        Setup(f"PostgreSQL, {n} replicas", [sidecar(f"pg{i}", work, mock.url, pg.dsn()) for i in range(n)], pg=pg),
    ]
    if n == 1:
        del setups[1]
    every = [t for setup in setups for t in setup.targets]
    try:
        mock.start(work)
        mock.wait("/health")
        for t in every:
            t.start(work)
            t.wait("/healthz")
        for setup in setups:  # one key per store; each alone replica has its own
            shared = make_key(setup.targets[0], **HIGH)[0] if setup.pg is not None else ""
            setup.auths = [shared or make_key(t, **HIGH)[0] for t in setup.targets]
        _, _, raw = http(
            "POST", setups[0].targets[0].url + "/v1/chat/completions", chat_body(False), setups[0].auths[0]
        )
        per_request = int(json.loads(raw)["usage"]["total_tokens"])
        pids = [t.proc.pid for t in every if t.proc]
        rounds: list[dict[str, Any]] = []
        for r in range(a.rounds):
            log(f"round {r + 1} of {a.rounds}: cost")
            rounds.append({s.name: cost_run(lg, s, pids, a, body) for s in setups})
        log("overshoot")
        over = overshoot(lg, setups[-1].targets, pg, a, body, per_request)
    finally:
        for t in reversed([mock, *every]):
            t.stop()
        pg.stop()
    report = render(a, rounds, over, per_request)
    print(report)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else ROOT / "bench-results" / f"cluster-{stamp}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(report)
    log(f"written to {out}")


def render(a: Any, rounds: list[dict[str, Any]], over: list[dict[str, Any]], per_request: int) -> str:
    med = statistics.median
    names = list(rounds[0])
    base, last = names[0], names[-1]

    def per(name: str, what: str) -> float:
        return med([r[name][what] / r[name]["requests"] for r in rounds])

    def ratios(name: str) -> str:
        each = [(r[name]["cpu"] / r[name]["requests"]) / (r[base]["cpu"] / r[base]["requests"]) for r in rounds]
        return f"**{med(each):.2f}x** ({', '.join(f'{x:.2f}' for x in each)})"

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(n) for n in names) + " |"

    lines = [
        f"# {a.replicas} replicas on one PostgreSQL vs SQLite ({datetime.date.today()})",
        "",
        f"`bench/cluster.py --rounds {a.rounds} --duration {a.duration:g} --conns {a.conns} --replicas {a.replicas}`: "
        f"non-streaming chat from bench/loadgen.c, {a.conns} closed-loop connections split over the replicas, one "
        f"key with every limit set (rpm, tpm, concurrency, a daily budget) and far from reached; {per_request} "
        f"tokens per request. Medians of {a.rounds} rounds (per-round figures in brackets). 'Each alone': every "
        "replica its own SQLite store and key, nothing shared: what running that many processes costs here.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        row("requests/s", lambda n: f"{med([r[n]['requests'] / a.duration for r in rounds]):,.0f}"),
        row("sidecar CPU µs per request", lambda n: f"{per(n, 'cpu') * 1e6:,.0f}"),
        row(f"ratio to {base}", ratios),
        row("PostgreSQL CPU µs per request", lambda n: f"{per(n, 'pg_cpu') * 1e6:,.0f}" if n == last else ""),
        row("limit statements per request", lambda n: f"**{per(n, 'limit_statements'):.4f}**" if n == last else ""),
        row("all statements per request", lambda n: f"{per(n, 'all_statements'):.4f}" if n == last else ""),
        row("non-2xx answers", lambda n: str(sum(r[n]["non2xx"] for r in rounds))),
        "",
        f"Overshoot: a key per limit, low enough for the same load to run into it over {a.replicas} replicas.",
        "",
        "| limit | seconds | allowed (bucket + refill, or budget) | admitted | over |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {o['limit']} | {o['seconds']} | {o['allowed']:,} {o['unit']} | {o['got']:,} | {o['over']:+,} |"
        for o in over
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
