"""Saturation: the dispatch limit follows what the engine says of itself (`limits.saturation = "metrics"`).

An engine such as vLLM runs `max_num_seqs` requests at once and keeps the rest in its own first-come queue;
whatever waits there has lost the sidecar's fair order. So every `limits.saturation_interval` seconds (0.25) the
sidecar reads the engine's metrics page (the fetch that also answers `/metrics/upstream`: a scrape reuses it)
for requests waiting, requests running and the KV cache's use (0-1), summed over the page's label sets (KV:
the highest):

- vLLM: `vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (a 0-1 share
  despite its name; `vllm:gpu_cache_usage_perc` before 0.10);
- SGLang: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`;
- llama-server (started with `--metrics`): `llamacpp:requests_deferred`, `llamacpp:requests_processing`, and
  `llamacpp:kv_cache_usage_ratio` where the build still has it (recent ones do not: no KV check then);

and moves `LocalLimits.limit`, the requests dispatched at once, one step per reading (`Controller.step`):

- **saturated** (waiting above `limits.saturation_waiting` or KV above `limits.saturation_kv`): the limit drops
  to what the engine runs plus the waiting it may keep (`running + saturation_waiting`), never rising here.
  Requests already sent finish; nothing new goes until fewer than the limit are in flight.
- **room** (not saturated) while requests wait in the sidecar's queue (so the limit is what holds them): every
  `PROBE_EVERY` such readings the limit tries `stride` more, the stride doubling after each probe the engine
  took without queueing and going back to 1 when it queues. The engine's capacity is not on its page, so it
  can only be found by sending one more; spacing the probes keeps the one request a probe may leave in the
  engine's queue there for at most one interval in `PROBE_EVERY + 1`, and doubling finds a larger engine's
  room in a few probes.
- otherwise it stays. Always between 1 and `limits.global_concurrency`.

It starts at `START` (8), not at `global_concurrency`: until the engine first queues its room is not known, so
while requests wait in the sidecar and the engine has room the limit doubles at every reading (a slow start, as
TCP's: 8, 16, 32, ... reaches 256 in 1.25 s), and a first burst waits in the sidecar's fair order instead of
filling the engine's queue. So under a steady load the engine's queue is empty but for a probe, or for what one
doubling sent beyond its room (drained at the engine's pace while nothing new goes).
When the page cannot be read (an error, a status other than 200, or no waiting and running series) the limit
is `global_concurrency` as with saturation off: state `fallback`, logged once per change, in `/readyz` and
`sidecar_engine_saturation_state`; when it can again, the limit adapts from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric

from sidecar.config import LimitsCfg
from sidecar.errors import TRANSPORT_FAILURES
from sidecar.limits.local import LocalLimits
from sidecar.ops.series import gauge

log = logging.getLogger("sidecar.saturation")
PROBE_EVERY = 8  # readings with room and waiters between two probes (2 s at the default interval)
START = 8  # the limit while the engine's room is not known yet (at start, after a fallback): doubled per reading
STATES = ("off", "metrics", "fallback")
# Per engine: (waiting, running, KV-cache names); the first whose waiting and running series are on the page.
SERIES = (
    (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    ("sglang:num_queue_reqs", "sglang:num_running_reqs", ("sglang:token_usage",)),
    ("llamacpp:requests_deferred", "llamacpp:requests_processing", ("llamacpp:kv_cache_usage_ratio",)),
)
_NAMES = "|".join(re.escape(n) for w, r, kv in SERIES for n in (w, r, *kv))
# A sample line of a wanted series: its name, its labels (quoted values may hold braces) and its value.
_SAMPLE = re.compile(rf'^({_NAMES})(?:\{{(?:[^"}}]|"(?:[^"\\]|\\.)*")*\}})?[ \t]+(\S+)'.encode(), re.M)
Fetch = Callable[[float], Awaitable[tuple[int, str, bytes]]]


@dataclass(frozen=True, slots=True)
class Reading:
    """What the engine's page said: requests waiting in its queue, running, and its KV cache's use (None: not
    on the page)."""

    waiting: float
    running: float
    kv: float | None


def parse(page: bytes) -> Reading | None:
    """The first engine of `SERIES` whose waiting and running series the page has, or None."""
    sums: dict[str, float] = {}
    highest: dict[str, float] = {}
    for match in _SAMPLE.finditer(page):
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if math.isfinite(value):
            name = match.group(1).decode()
            sums[name] = sums.get(name, 0.0) + value
            highest[name] = max(highest.get(name, value), value)
    for waiting, running, kvs in SERIES:
        if waiting in sums and running in sums:
            kv = next((highest[n] for n in kvs if n in highest), None)
            return Reading(sums[waiting], sums[running], kv)
    return None


class Controller:
    """The dispatch limit, one step per reading (the module's docstring says how)."""

    def __init__(self, top: int, waiting: int, kv: float) -> None:
        self.top = top  # limits.global_concurrency
        self.waiting = waiting
        self.kv = kv
        self.limit = min(top, START)
        self.stride = 1  # the next probe's step
        self.calm = 0  # readings with room and waiters since the last probe or saturation
        self.found = False  # the engine queued since the page was last read: its room is known
        self.blind = True  # the last step had no reading (the limit was global_concurrency)

    def step(self, reading: Reading | None, waiters: bool) -> int:
        if reading is None:
            self.limit, self.stride, self.calm, self.found, self.blind = self.top, 1, 0, False, True
            return self.limit
        if self.blind:  # the page is back: start again from a few, or what the engine runs now
            self.limit = min(self.top, max(START, int(reading.running) + self.waiting))
            self.blind = False
        if reading.waiting > self.waiting or (reading.kv is not None and reading.kv > self.kv):
            self.limit = max(1, min(self.limit, int(reading.running) + self.waiting))
            self.stride, self.calm, self.found = 1, 0, True
        elif waiters and self.limit < self.top and not self.found:
            self.limit = min(self.top, self.limit * 2)  # slow start: the room is not known, the engine has some
        elif waiters and self.limit < self.top:
            self.calm += 1
            if self.calm >= PROBE_EVERY:
                self.limit = min(self.top, self.limit + self.stride)
                self.stride, self.calm = self.stride * 2, 0
        return self.limit


class Saturation:
    """Reads the engine's page every `limits.saturation_interval` seconds and sets the dispatch limit; its state
    (`off`, `metrics`, `fallback`) is in `/readyz` and the metrics."""

    def __init__(self, cfg: LimitsCfg, local: LocalLimits, fetch: Fetch | None) -> None:
        self.cfg = cfg
        self.local = local
        self.fetch = fetch
        self.controller = Controller(cfg.global_concurrency, cfg.saturation_waiting, cfg.saturation_kv)
        self.reading: Reading | None = None
        self._state: str | None = "off" if cfg.saturation == "off" or fetch is None else None  # None: not read yet
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # set by `close`: the loop stops between readings

    @property
    def state(self) -> str:
        return self._state or "fallback"  # before the first reading the limit is global_concurrency

    async def start(self) -> None:
        if self._state != "off":
            self.local.set_limit(self.controller.limit)  # the slow start's, from the first request on
            self._task = asyncio.get_running_loop().create_task(self._tend())

    async def close(self) -> None:
        if self._task is not None:
            self._closing.set()
            await self._task
            self._task = None

    async def _tend(self) -> None:
        while True:
            await self.round()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.cfg.saturation_interval)
                return

    async def round(self) -> None:
        """One reading of the page, and the limit it gives."""
        reading, why = await self._read()
        self._observe(reading, why)
        limit = self.controller.step(reading, len(self.local.queue) > 0)
        if limit != self.local.limit:
            self.local.set_limit(limit)

    async def _read(self) -> tuple[Reading | None, str]:
        assert self.fetch is not None  # started only with one
        try:
            # A page a scrape fetched within half an interval is recent enough.
            status, _, body = await self.fetch(self.cfg.saturation_interval / 2)
        except TRANSPORT_FAILURES as exc:
            return None, type(exc).__name__
        if status != 200:
            return None, f"status {status}"
        reading = parse(body)
        return reading, "" if reading is not None else "no waiting and running series of vLLM, SGLang or llama-server"

    def _observe(self, reading: Reading | None, why: str) -> None:
        """Keep the reading; log a change of state once (the page is read four times a second)."""
        self.reading = reading
        state = "metrics" if reading is not None else "fallback"
        if state == self._state:
            return
        self._state = state
        if reading is None:
            fields = {"reason": why, "dispatch_limit": self.cfg.global_concurrency}
            log.warning("engine metrics unreadable: dispatch limit is global_concurrency", extra={"fields": fields})
        else:
            log.info("engine metrics read: the dispatch limit follows the engine's saturation")

    def collect(self) -> Iterator[Metric]:
        yield gauge(
            "sidecar_dispatch_limit", "Requests the sidecar sends the upstream at once (0: no limit).", (),
            {(): self.local.limit},
        )  # fmt: skip
        yield gauge(
            "sidecar_engine_saturation_state",
            "1 for how the dispatch limit is set: off (global_concurrency), metrics (the engine's page), fallback "
            "(the page cannot be read: global_concurrency).",
            ("state",), {(s,): float(s == self.state) for s in STATES},
        )  # fmt: skip
        r = self.reading
        if r is None:
            return  # no reading, or the last one failed: no figures rather than stale ones
        yield gauge(
            "sidecar_engine_requests_waiting", "Requests in the engine's queue, last read.", (), {(): r.waiting}
        )
        yield gauge("sidecar_engine_requests_running", "Requests the engine runs, last read.", (), {(): r.running})
        if r.kv is not None:
            yield gauge("sidecar_engine_kv_cache_usage", "The engine's KV-cache use (0-1), last read.", (), {(): r.kv})
