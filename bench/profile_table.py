"""Where one request's CPU goes: a py-spy raw profile (collapsed stacks) sorted into the buckets of the CPU budget
table in bench/README.md, as a share of the samples and, given the CPU µs per request measured beside it, in µs.

    python3 bench/profile_table.py bench-results/profile-chat.txt [CPU_US_PER_REQUEST]

Each sample goes to the bucket of its innermost frame that a rule names (the rules below, first match wins for
a frame); a sample no frame of ours or aiohttp's claims is `other` (the event loop's own C code, asyncio). Idle
threads are not sampled (py-spy without `--idle`), but a thread that is runnable and waits for a core counts,
so on a shared machine the write system calls (which wake the peer that shares the core) weigh more here than
in utime+stime. Standard library only.
"""

from __future__ import annotations

import collections
import sys

BUCKETS = (
    "server parse",
    "auth",
    "admission",
    "body read/parse",
    "upstream client",
    "relay",
    "usage row",
    "access-log line",
    "metrics",
    "other",
)
# (substring of a frame, bucket); a frame is "function (path:line)".
RULES: tuple[tuple[str, str], ...] = (
    ("sidecar/ops/logs.py", "access-log line"),
    ("sidecar/ops/metrics.py", "metrics"),
    ("sidecar/ops/series.py", "metrics"),
    ("sidecar/records/", "usage row"),
    ("sidecar/store/", "usage row"),
    ("aiosqlite/", "usage row"),
    ("sidecar/audit/", "usage row"),
    ("sidecar/app.py", "usage row"),  # the record's finisher
    ("sidecar/keys/", "auth"),
    ("sidecar/limits/", "admission"),
    ("_admit (sidecar/proxy.py", "admission"),
    ("sidecar/wire/body.py", "body read/parse"),
    ("read_body (sidecar/edge.py", "body read/parse"),
    ("_read_call (sidecar/proxy.py", "body read/parse"),
    ("sidecar/upstream/", "upstream client"),
    ("to_upstream (sidecar/wire/headers.py", "upstream client"),
    ("_send (sidecar/relay.py", "upstream client"),
    ("sidecar/relay.py", "relay"),
    ("sidecar/exchange.py", "relay"),
    ("sidecar/wire/", "relay"),
    ("aiohttp/web_response.py", "relay"),
    ("aiohttp/http_writer.py", "relay"),
    ("Relayed", "relay"),
    ("aiohttp/web_protocol.py", "server parse"),
    ("aiohttp/http_parser.py", "server parse"),
    ("aiohttp/web_request.py", "server parse"),
    ("aiohttp/web_app.py", "server parse"),
    ("aiohttp/helpers.py", "server parse"),
    ("sidecar/edge.py", "server parse"),
    ("sidecar/", "other"),  # the pipeline's own glue (proxy.py, inflight.py, ...)
)


# A waiting thread's frame (the audit sink's poll, aiosqlite's queue) that py-spy took for a running one.
IDLE = ("Condition.wait (", "_connection_worker_thread (")


def bucket(stack: str) -> str:
    frames = stack.split(";")
    if frames[-1].startswith(IDLE) and "core.py:63" not in frames[-1]:
        return "other"
    for frame in reversed(frames):
        for needle, name in RULES:
            if needle in frame:
                return name
    return "other"


def table(path: str) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            counts[bucket(stack)] += int(n)
            total += int(n)
    return total, counts


def main() -> None:
    total, counts = table(sys.argv[1])
    per_request = float(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"samples {total}")
    print("| part | share | µs/req |" if per_request else "| part | share |")
    print("|---|---:|---:|" if per_request else "|---|---:|")
    for name in BUCKETS:
        share = counts[name] / max(total, 1)
        us = f" {share * per_request:.0f} |" if per_request else ""
        print(f"| {name} | {100 * share:.1f}% |{us}")


if __name__ == "__main__":
    main()
