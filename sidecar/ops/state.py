"""RunState: the process's run state, owned by the app: set by the drain logic, read by the probes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def _no_drain() -> None:
    return None


@dataclass
class RunState:
    draining: bool = False
    drained: bool = False  # the drain has finished: no request is in flight and no new one is taken
    # Why this replica must not take traffic although it runs: a store that came back late with another
    # pepper's fingerprint (at start that stops the process; later it can only turn /readyz 503).
    refused: str = ""
    # Starts the drain without stopping the process (`POST /drain`); the runner sets it when it listens.
    request_drain: Callable[[], None] = field(default=_no_drain)
