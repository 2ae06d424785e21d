"""RunState: the process's run state, owned by the app: set by the drain logic, read by the probes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunState:
    draining: bool = False
