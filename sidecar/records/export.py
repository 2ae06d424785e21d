"""Usage export: stored request rows pushed as CloudEvents batches (OpenMeter's ingest API, or any endpoint that
takes `application/cloudevents-batch+json`), at least once, from a cursor kept in the store.

The events. One per `request_log` row, structured JSON: `specversion` 1.0, `id` the request id (a receiver drops
repeats by `source` and `id`, so `source` is one setting for every replica, not a replica's name), `type`,
`subject` the key id (`anonymous` for a row without a key), `time` the request's start (as the sidecar's own
reports and budgets count it) and `data` its usage (`event`). `sidecar usage export` writes the same events, one
JSON object a line.

The cursor. Rows reach the store late and out of time order: the writer batches, the spool replays rows after an
outage hours later, and a row carries its start time, so a cursor on `started_at` (or `finished_at`) would pass
rows inserted after it with an older time. The cursor is on the insertion order instead, which only grows:
SQLite: `seq`, an AUTOINCREMENT rowid (never reused, never renumbered), taken under SQLite's one write lock and so
in commit order: "every row after seq N" is complete once N was read. PostgreSQL: sequence values are taken
before commit, and transactions commit out of that order, so a cursor on a sequence could pass a row whose
transaction commits a moment later. Each row carries the id of the transaction that inserted it (`xact`, by the
column's default), and the export reads only rows whose transaction is older than the snapshot's `xmin`, below
which every transaction has ended: nothing can appear there any more. The cursor is (xact, request_id), and
rows past it below `xmin` are complete. (A transaction left open for long on the database holds the export back
until it ends; it never makes it skip.) Rows stored before version 9 of the schema have xact 0: they go first.

At least once. A round reads a batch past the cursor, POSTs it, and only then moves the cursor (so a crash, a
restart or a store outage between the two sends that batch again: a repeat, never a gap). A POST that fails
(connection refused, timeout, 5xx, 408, 429) is retried with exponential back-off and jitter up to
`export.max_backoff` (a `Retry-After` is honoured). Any other 4xx means the receiver refuses what it is given (a
wrong token or URL, a body too large): that is logged once, and the batch is retried at `export.max_backoff` until
someone fixes it; nothing is skipped, since a skipped batch is usage never billed. Rows deleted by
`store.retention` before they went out are not sent.

Replicas. The cursor is a row of `export_cursors` held on a lease of the store's clock: one replica exports at a
time; the others check each interval and take it over when the holder's lease ran out (it crashed) or it let go
(it stopped). The cursor moves by compare-and-set on its position and holder, so a holder that lost its lease
mid-batch cannot move it back: two replicas overlap by at most the batch in flight.

Never on the request path: one background task, stopped by an event between rounds (a POST in flight is
abandoned: its batch goes again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
from prometheus_client.metrics_core import Metric

from sidecar import __version__
from sidecar.config import ExportCfg
from sidecar.ops.series import counter, gauge
from sidecar.store.base import Store, StoreError

log = logging.getLogger("sidecar.export")

CURSOR = "usage"  # its row in export_cursors
BATCH_TYPE = "application/cloudevents-batch+json"
ANONYMOUS = "anonymous"  # the subject of a row without a key (auth off, or a request refused before one was known)
FIRST_ROUND = 1.0  # seconds after start (the store opens in the background meanwhile)
FIRST_BACKOFF = 1.0
TOKENS = ("prompt_tokens", "completion_tokens")
DETAILS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")  # null where the upstream said nothing
REASONS = ("connect", "5xx", "throttled", "4xx", "store")  # throttled: 429 or 408, try later


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def event(row: dict[str, Any], source: str, kind: str) -> dict[str, Any]:
    """A stored row as a structured CloudEvent. Prompt and completion tokens are integers (0 when nothing was
    charged), `total_tokens` is what the key's budget was charged (the upstream's total, else prompt plus
    completion); the details are the row's, null where the upstream did not say (never a guess as a figure)."""
    data: dict[str, Any] = {"model": row["model"]}
    data.update({name: int(row[name] or 0) for name in TOKENS})
    data.update({name: row.get(name) for name in DETAILS})
    total = row["total_tokens"]
    data["total_tokens"] = int(total if total is not None else data["prompt_tokens"] + data["completion_tokens"])
    data.update(
        status=row["status"], outcome=row["outcome"], error_code=row["error_code"], path=row["path"],
        stream=bool(row["stream"]), usage_source=row["usage_source"], duration_ms=round(row["latency_ms"], 3),
        ttft_ms=None if row["ttft_ms"] is None else round(row["ttft_ms"], 3),
    )  # fmt: skip
    return {
        "specversion": "1.0",
        "id": row["request_id"],
        "source": source,
        "type": kind,
        "subject": row["key_id"] or ANONYMOUS,
        "time": _rfc3339(row["started_at"]),
        "datacontenttype": "application/json",
        "data": data,
    }


def batch(rows: Sequence[dict[str, Any]], cfg: ExportCfg) -> bytes:
    """The body of one POST: a JSON array of structured events (`application/cloudevents-batch+json`)."""
    return orjson.dumps([event(r, cfg.source, cfg.type) for r in rows])


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: our own back-off instead


class Exporter:
    def __init__(self, store: Store, cfg: ExportCfg, token: str) -> None:
        self.store = store
        self.cfg = cfg
        self.headers = {"Content-Type": BATCH_TYPE, "User-Agent": f"sidecar/{__version__}"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        # Long enough to outlast the holder's slowest retry; a replica that stops lets go at once.
        self.lease = 2 * max(cfg.interval, cfg.max_backoff) + cfg.timeout
        self.exported = 0
        self.failures = dict.fromkeys(REASONS, 0)
        self.caught_up_at = 0.0  # when every stored row last was out
        self.leading = False
        self._refused: int | None = None  # the 4xx last logged: logged once until a POST succeeds
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        if self.cfg.url:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="export")

    async def close(self) -> None:
        task, self._task = self._task, None
        self._closing.set()  # not a cancel: one landing inside a store statement can be swallowed there
        if task is not None:
            await task
        if self.leading:  # the next replica to look takes the cursor at once, not after the lease
            with contextlib.suppress(StoreError):
                await self.store.export_release(CURSOR, self.store.replica)
                self.leading = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _closed_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    async def _run(self) -> None:
        wait, backoff = min(FIRST_ROUND, self.cfg.interval), FIRST_BACKOFF
        while not await self._closed_within(wait):
            try:
                await self.round()
            except StoreError as exc:
                self.failures["store"] += 1
                log.warning("export: the store failed; trying again", extra={"fields": {"error": str(exc)[:200]}})
                wait, backoff = self._jitter(backoff), min(backoff * 2, self.cfg.max_backoff)
                continue
            wait, backoff = self.cfg.interval, FIRST_BACKOFF

    def _jitter(self, backoff: float) -> float:
        return backoff / 2 + random.uniform(0, backoff / 2)  # spreads replicas' retries apart

    async def round(self) -> None:
        """Batches past the cursor until every stored row went out, the lease went elsewhere or closing."""
        holder = self.store.replica
        position = await self.store.export_claim(CURSOR, holder, self.lease)
        self.leading = position is not None
        while position is not None and not self._closing.is_set():
            rows, after = await self.store.export_rows(position, self.cfg.batch_size)
            if not rows:
                self.caught_up_at = time.time()
                return
            if not await self._deliver(batch(rows, self.cfg)):
                return
            if not await self.store.export_advance(CURSOR, holder, position, after, self.lease):
                log.warning("export: another replica took the cursor over; it goes on from there")
                self.leading = False
                return
            self.exported += len(rows)
            position = after

    async def _deliver(self, body: bytes) -> bool:
        """POST until the receiver takes it (True), or closing or the lease went elsewhere meanwhile (False)."""
        backoff = FIRST_BACKOFF
        while True:
            reason, retry_after = await self._post_or_close(body)
            if reason is None:
                self._refused = None
                return True
            if reason == "closing":
                return False
            self.failures[reason] += 1
            wait = self.cfg.max_backoff if reason == "4xx" else backoff
            wait = min(retry_after, self.cfg.max_backoff) if retry_after else self._jitter(wait)
            backoff = min(backoff * 2, self.cfg.max_backoff)
            if await self._closed_within(wait):
                return False
            with contextlib.suppress(StoreError):  # a long outage of the receiver: hold on to the cursor
                if await self.store.export_claim(CURSOR, self.store.replica, self.lease) is None:
                    self.leading = False
                    return False

    async def _post_or_close(self, body: bytes) -> tuple[str | None, float]:
        post = asyncio.ensure_future(self._post(body))
        closing = asyncio.ensure_future(self._closing.wait())
        await asyncio.wait({post, closing}, return_when=asyncio.FIRST_COMPLETED)
        closing.cancel()
        if not post.done():  # stopping: the batch goes again from the cursor, by whoever holds it next
            post.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await post
            return "closing", 0.0
        return post.result()

    async def _post(self, body: bytes) -> tuple[str | None, float]:
        """(None, 0) when the receiver took the batch; else why not and how long it asked us to wait."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout))
        try:
            async with self._session.post(self.cfg.url, data=body, headers=self.headers) as resp:
                excerpt = (await resp.content.read(300)).decode("utf-8", "replace")
                status, retry_after = resp.status, _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("export: the receiver is unreachable", extra={"fields": {"error": type(exc).__name__}})
            return "connect", 0.0
        if 200 <= status < 300:
            return None, 0.0
        if status >= 500 or status in (408, 429):
            log.warning("export: the receiver failed; retrying", extra={"fields": {"status": status}})
            return ("5xx" if status >= 500 else "throttled"), retry_after
        if self._refused != status:  # once: it repeats every max_backoff until fixed
            self._refused = status
            log.error(
                "export: the receiver refuses the batch; held (nothing is skipped) until it takes it",
                extra={"fields": {"status": status, "answer": excerpt}},
            )
        return "4xx", 0.0

    def collect(self) -> Iterator[Metric]:
        yield counter("sidecar_export_events_total", "Usage events the receiver took (export.url).", (), {
            (): self.exported
        })  # fmt: skip
        yield counter(
            "sidecar_export_failures_total",
            "Failed export attempts, by reason (connect, 5xx, throttled, 4xx, store); each is retried.",
            ("reason",),
            {(r,): n for r, n in self.failures.items()},
        )
        yield gauge(
            "sidecar_export_caught_up_timestamp_seconds",
            "When this replica last found every stored row exported (0: not since start).",
            (),
            {(): self.caught_up_at},
        )
        yield gauge("sidecar_export_leader", "1 when this replica holds the export cursor.", (), {
            (): float(self.leading)
        })  # fmt: skip
