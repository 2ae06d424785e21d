"""Balances: the statements of the limits replicas share (#17), written once for both backends and mixed into
`SqlStore`: token budgets and per-minute buckets (`limit_balances`, borrowed from by `sidecar.limits.borrowing`) and
concurrency slots on a lease (`limit_slots`, `sidecar.limits.slots`). Balances are computed from the database's clock
(`db_now`), never a replica's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sidecar.store.base import Params


class Balances:
    db_now = ""  # the database's clock in epoch seconds, as SQL (each backend sets it)

    if TYPE_CHECKING:  # SqlStore's primitives, which these statements run on

        def _sql(self, sql: str) -> str: ...

        async def _run(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]: ...

    # --- shared budgets: the authority replicas borrow allowances from ------------------------------------
    async def borrow_budget(
        self, key_id: str, bucket: str, budget: int, since: float, need: float, fraction: float
    ) -> tuple[float, float]:
        """Take an allowance from a key's budget balance for one period (`bucket`): at least `need` (when the
        balance holds it), else `fraction` of what is left, never more than is left. The balance starts, the
        first time any replica asks, at the budget less what the key's stored requests used since `since`.
        One row, one statement each: the row's lock (PostgreSQL) or the write lock (SQLite) orders borrowers.
        Returns (granted, balance left)."""
        start = self._sql(
            "INSERT INTO limit_balances (key_id, dim, bucket, level, granted, updated_at) "
            "SELECT ?, 'budget', ?, ? - COALESCE(SUM(COALESCE(total_tokens, COALESCE(prompt_tokens, 0) + "
            "COALESCE(completion_tokens, 0))), 0), 0, ? FROM request_log WHERE key_id = ? AND started_at >= ? "
            "ON CONFLICT (key_id, dim, bucket) DO NOTHING"
        )
        want = "(CASE WHEN level * ? > ? THEN level * ? ELSE ? END)"  # max(level * fraction, need)
        grant = f"(CASE WHEN level <= 0 THEN 0 WHEN level < {want} THEN level ELSE {want} END)"
        take = self._sql(
            f"UPDATE limit_balances SET granted = {grant}, level = level - {grant}, updated_at = ? "
            "WHERE key_id = ? AND dim = 'budget' AND bucket = ? RETURNING granted, level"
        )
        now = time.time()
        shares = (fraction, need, fraction, need)
        rows = await self._run(
            [
                (start, (key_id, bucket, budget, now, key_id, since)),
                (take, (*shares, *shares, *shares, *shares, now, key_id, bucket)),
            ]
        )
        return float(rows[0][0]), float(rows[0][1])

    async def borrow_rate(
        self, key_id: str, kind: str, capacity: float, per_second: float, need: float, fraction: float
    ) -> tuple[float, float]:
        """Take an allowance from a key's per-minute bucket (`rpm` or `tpm`), refilled by the database's clock
        (never a replica's) up to `capacity`: at least `need` when it holds that, else `fraction` of its
        level. Returns (granted, level left)."""
        now, bucket = self.db_now, f"{capacity:g}"
        start = self._sql(
            "INSERT INTO limit_balances (key_id, dim, bucket, level, granted, updated_at) "
            f"VALUES (?, ?, ?, ?, 0, {now}) ON CONFLICT (key_id, dim, bucket) DO NOTHING"
        )
        # The level refilled since the last change, capped: every SET sees the row as it was.
        full = f"(level + ({now} - updated_at) * ?)"
        level = f"(CASE WHEN {full} > ? THEN ? ELSE {full} END)"
        want = f"(CASE WHEN {level} * ? > ? THEN {level} * ? ELSE ? END)"
        grant = f"(CASE WHEN {level} <= 0 THEN 0 WHEN {level} < {want} THEN {level} ELSE {want} END)"
        take = self._sql(
            f"UPDATE limit_balances SET granted = {grant}, level = {level} - {grant}, updated_at = {now} "
            "WHERE key_id = ? AND dim = ? AND bucket = ? RETURNING granted, level"
        )
        lv = (per_second, capacity, capacity, per_second)
        wt = (*lv, fraction, need, *lv, fraction, need)
        gr = (*lv, *lv, *wt, *lv, *wt)  # the placeholders of `grant`, in order
        params = (*gr, *lv, *gr, key_id, kind, bucket)
        rows = await self._run([(start, (key_id, kind, bucket, capacity)), (take, params)])
        return float(rows[0][0]), float(rows[0][1])

    async def give_back(self, key_id: str, kind: str, bucket: str, amount: float, cap: float | None = None) -> None:
        """Return an unused allowance (or, negative, charge usage beyond one) to a balance, never above `cap`."""
        level = "level + ?" if cap is None else "(CASE WHEN level + ? > ? THEN ? ELSE level + ? END)"
        params: tuple[Any, ...] = (amount,) if cap is None else (amount, cap, cap, amount)
        sql = f"UPDATE limit_balances SET level = {level} WHERE key_id = ? AND dim = ? AND bucket = ?"
        await self._run([(self._sql(sql), (*params, key_id, kind, bucket))])

    # --- shared concurrency: slots a replica holds, on a lease it renews -------------------------------------
    lock_key = "SELECT 1"  # serialises borrowers of one key's slots (SQLite: the write lock already does)

    async def borrow_slots(self, key_id: str, replica: str, limit: int, want: int, lease: float) -> int:
        """Hold up to `want` more of a key's `limit` slots for `replica`, counting every replica's unexpired
        ones; the replica's holding afterwards (its lease renewed)."""
        now = self.db_now
        free = (
            f"(? - (SELECT COALESCE(SUM(o.slots), 0) FROM limit_slots o WHERE o.key_id = ? AND o.expires_at > {now} "
            "AND o.replica <> ?) - (CASE WHEN expires_at > " + now + " THEN slots ELSE 0 END))"
        )
        grant = f"(CASE WHEN {free} <= 0 THEN 0 WHEN {free} < ? THEN {free} ELSE ? END)"
        kept = f"(CASE WHEN expires_at > {now} THEN slots ELSE 0 END)"  # an expired holding was given up
        fp = (limit, key_id, replica)
        rows = await self._run(
            [
                (self._sql(self.lock_key), (key_id,) if "?" in self.lock_key else ()),
                (
                    self._sql(
                        "INSERT INTO limit_slots (key_id, replica, slots, expires_at) VALUES (?, ?, 0, 0) "
                        "ON CONFLICT (key_id, replica) DO NOTHING"
                    ),
                    (key_id, replica),
                ),
                (
                    self._sql(
                        f"UPDATE limit_slots SET slots = {kept} + {grant}, expires_at = {now} + ? "
                        "WHERE key_id = ? AND replica = ? RETURNING slots"
                    ),
                    (*fp, *fp, want, *fp, want, lease, key_id, replica),
                ),
            ]
        )
        return int(rows[0][0])

    async def return_slots(self, key_id: str, replica: str, keep: int) -> None:
        """Set what `replica` holds of a key's slots to `keep`: the replica's own count is the truth for its
        row, so a borrow whose answer was lost (committed, then the connection cut) is put right here."""
        sql = "UPDATE limit_slots SET slots = ? WHERE key_id = ? AND replica = ?"
        await self._run([(self._sql(sql), (keep, key_id, replica))])

    async def renew_slots(self, replica: str, lease: float) -> None:
        """Keep this replica's slots for another `lease` seconds; a replica that stops renewing (killed) loses
        them when they expire, and other replicas can take them."""
        sql = f"UPDATE limit_slots SET expires_at = {self.db_now} + ? WHERE replica = ? AND slots > 0"
        await self._run([(self._sql(sql), (lease, replica))])
