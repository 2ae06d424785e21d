"""Scores of one mutation group, per module, from `mutmut results --all true`.

A mutant is killed when a test failed, timed out or the type checker refused it; survived otherwise (including
"no tests": code that no test of the group runs). A survivor listed in the group's equivalent file counts as equivalent.
Usage: score.py GROUP RESULTS EQUIVALENT SECONDS
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def module_of(name: str) -> str:
    """sidecar.limits.local.xǁLocalLimitsǁ_admit__mutmut_3 -> sidecar/limits/local.py"""
    return re.split(r"\.x[_ǁ]", name, maxsplit=1)[0].replace(".", "/") + ".py"


def main(group: str, results: str, equivalent: str, seconds: str) -> None:
    known = {line.split()[0] for line in Path(equivalent).read_text().splitlines() if line.strip() and line[0] != "#"}
    counts: dict[str, Counter[str]] = {}
    for line in Path(results).read_text().splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep:
            continue
        if status == "not checked":  # a run stopped before it reached this mutant
            kind = "unchecked"
        else:
            kind = "killed" if status in KILLED else "equivalent" if name in known else "survived"
        counts.setdefault(module_of(name), Counter())[kind] += 1
    for module, c in sorted(counts.items()):
        real = c["killed"] + c["survived"]
        score = 100.0 * c["killed"] / real if real else 100.0
        print(
            f"{group:9} {module:32} mutants {real + c['equivalent'] + c['unchecked']:4}  killed {c['killed']:4}  "
            f"survived {c['survived']:3}  equivalent {c['equivalent']:3}  score {score:5.1f}%  ({seconds} s)"
            + (f"  unchecked {c['unchecked']}" if c["unchecked"] else "")
        )


if __name__ == "__main__":
    main(*sys.argv[1:5])
