"""The Store protocol: what the proxy, the writer, the admin API and the CLI need from a database.

Rows cross this boundary as plain dataclasses and dicts; SQL lives beside each backend. Times are epoch
seconds (floats) in both backends, so the tables mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.records.record import ROW_FIELDS

REQUEST_COLUMNS = ROW_FIELDS  # the columns are the record's fields, by name
KEY_COLUMNS = (
    "id", "name", "hash", "created_at", "expires_at", "revoked_at", "concurrency", "rpm", "tpm", "models",
    "audit", "updated_at", "budget_tokens", "budget_period", "weight", "priority", "cache_group",
)  # fmt: skip
Params = Sequence[Any]  # a statement's parameters
USAGE_GROUPS = ("key", "model", "day")
USAGE_FIELDS = (
    "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens",
    "reasoning_tokens", "failed",
)  # fmt: skip
"""The columns of a usage report, after its group (`key`, `model` or `day`)."""


class StoreError(Exception):
    """The store could not do what was asked.

    `transient` errors (unreachable, locked, busy, disk) may succeed later unchanged: rows wait in the spool.
    Others are about the data (a value the column cannot hold): retrying the same row cannot help.
    """

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient
        self.written = 0  # rows of the failed call committed before it failed (SQLite commits in chunks)


class ReportTimeout(StoreError):
    """A report query ran past `store.report_timeout` and was stopped; asking for less (a shorter range) helps."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the report query took longer than {seconds:g}s and was stopped", transient=False)


@dataclass(frozen=True)
class KeyRow:
    id: str
    name: str
    hash: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    audit: str | None = None  # "on" / "off" forces audit capture for this key; None follows the policy
    updated_at: float = 0.0
    budget_tokens: int | None = None  # tokens per `budget_period` (day, week, month or a duration); None: none
    budget_period: str | None = None
    weight: float | None = None  # its share of the upstream under contention (limits/queue.py); None: 1
    priority: str | None = None  # "high", "normal" or "low": its class in the dispatch queue; None: normal
    cache_group: str | None = None  # keys of one group share a prefix-cache salt (upstream.cache_salt); None: own

    def public(self) -> dict[str, Any]:
        """The key as shown by the admin API and CLI: everything but the hash."""
        return {c: (list(v) if isinstance(v := getattr(self, c), tuple) else v) for c in KEY_COLUMNS if c != "hash"}


@dataclass(frozen=True)
class AdminEvent:
    actor: str
    action: str
    target: str
    at: float
    changes: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None


@dataclass(frozen=True)
class RequestQuery:
    key_id: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    before: tuple[float, str] | None = None  # cursor: (started_at, request_id) of the last row seen
    request_id: str | None = None
    model: str | None = None


class Store(Protocol):
    kind: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def migrate(self) -> int: ...
    async def schema_version(self) -> int: ...
    async def ping(self) -> None: ...
    async def get_setting(self, name: str) -> str | None: ...
    async def put_setting(self, name: str, value: str, *, replace: bool) -> None: ...

    async def get_key(self, key_id: str) -> KeyRow | None: ...
    async def list_keys(self) -> list[KeyRow]: ...
    async def save_key(self, key: KeyRow, event: AdminEvent, *, create: bool) -> None: ...
    async def admin_events(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]: ...

    async def insert_requests(self, lines: Sequence[bytes]) -> int: ...
    async def requests(self, query: RequestQuery) -> list[dict[str, Any]]: ...
    async def usage(
        self, since: float, by: str, key_id: str | None = None, until: float | None = None, model: str | None = None
    ) -> list[dict[str, Any]]: ...
    async def usage_series(
        self, since: float, until: float | None, seconds: int, split: str, key_id: str | None = None
    ) -> list[dict[str, Any]]: ...
    async def requests_after(
        self, since: float, until: float | None, after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]: ...
    async def export_rows(self, position: str, limit: int) -> tuple[list[dict[str, Any]], str]: ...
    async def export_claim(self, name: str, holder: str, lease: float) -> str | None: ...
    async def export_advance(self, name: str, holder: str, old: str, new: str, lease: float) -> bool: ...
    async def export_release(self, name: str, holder: str) -> None: ...
    async def count_requests(self) -> int: ...
    async def tokens_since(self, key_id: str, since: float) -> int: ...
    @property
    def replica(self) -> str: ...  # this process, in the shared limits' tables
    async def borrow_budget(
        self, key_id: str, bucket: str, budget: int, period: tuple[float, float], need: float, fraction: float,
        lease: float,
    ) -> tuple[float, float]: ...  # fmt: skip
    async def tend_holdings(self, held: Sequence[tuple[str, str]], lease: float) -> None: ...
    async def budget_left(self, key_id: str, bucket: str, budget: int, period: tuple[float, float]) -> float: ...
    async def budget_levels(self, balances: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]: ...
    async def borrow_rate(
        self, key_id: str, kind: str, capacity: float, per_second: float, need: float, fraction: float
    ) -> tuple[float, float]: ...
    async def borrow_slots(self, key_id: str, replica: str, limit: int, want: int, lease: float) -> int: ...
    async def return_slots(self, key_id: str, replica: str, keep: int) -> None: ...
    async def renew_slots(self, replica: str, lease: float) -> None: ...
    async def give_back(
        self, key_id: str, kind: str, bucket: str, amount: float, cap: float | None = None, lease: float | None = None
    ) -> None: ...
    async def delete_older(self, table: str, cutoff: float, limit: int) -> int: ...

    async def insert_audit(self, lines: Sequence[bytes]) -> int: ...
    async def audit_records(self, query: RequestQuery) -> list[dict[str, Any]]: ...
