"""Limits and timeouts run on the monotonic clock: the wall clock may step (NTP, a VM resumed) and must never
lengthen or cut a deadline, refill a budget or expire a cache. A lint over the modules that keep them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sidecar

ROOT = Path(sidecar.__file__).parent
# Every module that measures a duration for a limit, a deadline, a backoff, a cache or a drain.
TIMED = [
    "limits/local.py", "limits/admission.py", "limits/borrowing.py", "limits/slots.py", "upstream/deadline.py",
    "upstream/pool.py", "upstream/response.py", "records/writer.py", "records/spool.py", "relay.py",
    "exchange.py", "inflight.py", "edge.py", "runner.py", "ops/rejects.py", "ops/health.py", "cors.py",
    "audit/bus.py", "audit/db.py", "admin/throttle.py",
]  # fmt: skip
WALL = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow"), ("date", "today")}


def wall_clock_reads(tree: ast.AST) -> list[int]:
    """Lines that read the wall clock: `time.time()`, `datetime.now()`, or such a name imported bare."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in WALL:
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("time", "datetime"):
            lines += [node.lineno for alias in node.names if (node.module, alias.name) in WALL]
    return lines


@pytest.mark.parametrize("module", TIMED)
def test_timed_modules_never_read_the_wall_clock(module):
    assert wall_clock_reads(ast.parse((ROOT / module).read_text())) == []


def test_the_lint_finds_a_wall_clock_read():
    assert wall_clock_reads(ast.parse("import time\ndeadline = time.time() + 5")) == [2]
    assert wall_clock_reads(ast.parse("from time import time\n")) == [1]
    assert wall_clock_reads(ast.parse("from datetime import datetime\nx = datetime.now()")) == [2]


def test_auth_reads_the_wall_clock_only_against_stored_wall_times():
    """auth.py compares a key's `expires_at` (a stored calendar time) with the wall clock, and converts what is
    left into a monotonic bound for its cache; nothing else in it reads the wall clock."""
    source = (ROOT / "keys/auth.py").read_text().splitlines()
    for line in wall_clock_reads(ast.parse("\n".join(source))):
        assert "expires_at" in source[line - 1], source[line - 1]


def test_the_audit_files_read_the_wall_clock_only_against_segment_times():
    """audit/files.py names segments by the calendar and deletes those whose last write (a file's mtime, a wall
    time) is older than `audit.jsonl_retention`; its timers (rotation by age, the sweep's period) are monotonic."""
    source = (ROOT / "audit/files.py").read_text().splitlines()
    for line in wall_clock_reads(ast.parse("\n".join(source))):
        assert "retention" in source[line - 1] or "strftime" in source[line - 1], source[line - 1]
