"""A pytest plugin for mutation runs: the tests of a mutant run fastest first.

mutmut hands each mutant's tests to pytest as an unordered set and stops at the first failure (`-x`), so a
mutant that a 10 ms test kills can still wait for a 5 s test that happened to come first. With the durations
mutmut measured in its stats pass (`mutmut-stats.json`, beside the tests it runs), the quick tests go first.
scripts/mutate.sh copies it into the scratch tree's tests/ and loads it with `-p tests.mutation_fastfirst`;
never part of the normal suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pytest_collection_modifyitems(items: list[Any]) -> None:
    stats = Path("mutmut-stats.json")
    if not stats.exists():  # the stats pass itself: nothing measured yet
        return
    durations: dict[str, float] = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
