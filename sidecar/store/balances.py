"""Balances: the statements of the limits replicas share (#17), written once for both backends and mixed into
`SqlStore`: token budgets and per-minute buckets (`limit_balances`, borrowed from by `sidecar.limits.borrowing`),
what each replica holds of a budget on a lease (`limit_holders`) and concurrency slots on a lease (`limit_slots`,
`sidecar.limits.slots`). Balances are computed from the database's clock (`db_now`), never a replica's.

A budget's balance and its holdings keep one sum: `level + SUM(outstanding)` is the budget less what the stored
rows used in the period. A borrow moves an amount from `level` to the borrower's holding, a give-back moves it
back, and a stored row of the key's is charged to the holding of the replica that wrote it (else to `level`:
a row replayed from a journal after a restart). So what a replica holds is what it borrowed and has not spent
in a stored row; when its lease expires (killed, or silent for longer than the lease), that goes back to
`level` and nothing is counted twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import orjson

from sidecar.store.base import Params

USED = "COALESCE(total_tokens, COALESCE(prompt_tokens, 0) + COALESCE(completion_tokens, 0))"
"""What a stored row used of its key's budget, as SQL over `request_log`'s columns."""


class Balances:
    db_now = ""  # the database's clock in epoch seconds, as SQL (each backend sets it)
    json_items = ""  # the items of a JSON array parameter as rows of one column, as SQL (each backend sets it)

    if TYPE_CHECKING:  # SqlStore's primitives, which these statements run on

        def _sql(self, sql: str) -> str: ...

        async def _run(self, statements: Sequence[tuple[str, Params]]) -> list[tuple[Any, ...]]: ...

        async def _fetch(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...

        async def _report(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...

    @cached_property
    def replica(self) -> str:
        """This process, in `limit_holders`: its borrows and the rows it stores are charged to the same holding."""
        return uuid.uuid4().hex[:16]

    # --- shared budgets: the authority replicas borrow allowances from ------------------------------------
    async def borrow_budget(
        self, key_id: str, bucket: str, budget: int, period: tuple[float, float], need: float, fraction: float,
        lease: float,
    ) -> tuple[float, float]:  # fmt: skip
        """Take an allowance from a key's budget balance for one period (`bucket`, `period` its start and end):
        at least `need` (when the balance holds it), else `fraction` of what is left, never more than is left,
        held by this replica on a lease of `lease` seconds. The balance starts, the first time any replica asks,
        at the budget less what the key's stored requests used since the period's start; holdings of replicas
        whose lease expired go back to it first. One row, one transaction each: the row's lock (PostgreSQL) or
        the write lock (SQLite) orders borrowers. Returns (granted, balance left)."""
        since, until = period
        start = self._sql(
            "INSERT INTO limit_balances (key_id, dim, bucket, level, granted, updated_at, starts_at, ends_at) "
            f"SELECT ?, 'budget', ?, ? - COALESCE(SUM({USED}), 0), 0, ?, ?, ? FROM request_log "
            "WHERE key_id = ? AND started_at >= ? ON CONFLICT (key_id, dim, bucket) DO NOTHING"
        )
        want = "(CASE WHEN level * ? > ? THEN level * ? ELSE ? END)"  # max(level * fraction, need)
        grant = f"(CASE WHEN level <= 0 THEN 0 WHEN level < {want} THEN level ELSE {want} END)"
        take = self._sql(
            f"UPDATE limit_balances SET granted = {grant}, level = level - {grant}, updated_at = ?, starts_at = ?, "
            "ends_at = ? WHERE key_id = ? AND dim = 'budget' AND bucket = ?"
        )
        now = time.time()
        shares = (fraction, need, fraction, need)
        this = (key_id, bucket)
        rows = await self._run(
            [
                (start, (key_id, bucket, budget, now, since, until, key_id, since)),
                *self._reclaim(this),
                (take, (*shares, *shares, *shares, *shares, now, since, until, *this)),
                self._hold("granted", lease, this),
                (
                    self._sql(
                        "SELECT granted, level FROM limit_balances WHERE key_id = ? AND dim = 'budget' AND bucket = ?"
                    ),
                    this,
                ),
            ]
        )
        return float(rows[0][0]), float(rows[0][1])

    def _hold(self, amount: str, lease: float, balance: tuple[str, str], params: Params = ()) -> tuple[str, Params]:
        """The statement adding `amount` (SQL over the balance's row, with `params`) to this replica's holding of
        a budget balance, its lease renewed; the holding is made when there is none (a give-back after the lease
        expired makes a negative one: it goes back, as a charge, when that expires)."""
        sql = (
            "INSERT INTO limit_holders (key_id, dim, bucket, replica, outstanding, expires_at) "
            f"SELECT key_id, dim, bucket, ?, {amount}, {self.db_now} + ? FROM limit_balances "
            "WHERE key_id = ? AND dim = 'budget' AND bucket = ? ON CONFLICT (key_id, dim, bucket, replica) DO UPDATE "
            "SET outstanding = limit_holders.outstanding + excluded.outstanding, expires_at = excluded.expires_at"
        )
        return self._sql(sql), (self.replica, *params, lease, *balance)

    def _reclaim(self, balance: tuple[str, str] | None = None) -> list[tuple[str, Params]]:
        """Statements that give the holdings whose lease expired (of one budget `balance`, or all) back to their
        balances and forget them. Here two statements against one cut-off: SQLite runs one write transaction at
        a time, so no other replica returns the same holdings meanwhile (PostgreSQL, where one could: a single
        statement, `PostgresStore._reclaim`). SQLite's clock is this machine's: the cut-off is read here."""
        cut = time.time()
        one = "h.key_id = ? AND h.dim = 'budget' AND h.bucket = ? AND " if balance else ""
        scope = balance or ()
        mine = "h.key_id = limit_balances.key_id AND h.dim = limit_balances.dim AND h.bucket = limit_balances.bucket"
        expired = f"FROM limit_holders h WHERE {one}{mine} AND h.expires_at < ?"
        give = (
            f"UPDATE limit_balances SET level = level + (SELECT SUM(h.outstanding) {expired}) "
            f"WHERE EXISTS (SELECT 1 {expired})"
        )
        forget = f"DELETE FROM limit_holders AS h WHERE {one}h.expires_at < ?"
        return [(self._sql(give), (*scope, cut, *scope, cut)), (self._sql(forget), (*scope, cut))]

    async def tend_holdings(self, held: Sequence[tuple[str, str]], lease: float) -> None:
        """Renew this replica's holdings of the budget balances `held` ((key, bucket) pairs) for `lease` seconds,
        and give the holdings whose lease expired (a replica killed, or this one's own after a long outage) back
        to their balances."""
        if held:
            renew = self._sql(
                f"UPDATE limit_holders SET expires_at = {self.db_now} + ? WHERE replica = ? AND dim = 'budget' "
                f"AND key_id || ' ' || bucket IN ({self.json_items})"
            )
            pairs = orjson.dumps([f"{key} {bucket}" for key, bucket in held]).decode()
            await self._run([(renew, (lease, self.replica, pairs))])
        # A read first: the write (and SQLite's write lock) only when there is something to return.
        if await self._fetch(f"SELECT 1 FROM limit_holders WHERE expires_at < {self.db_now} LIMIT 1"):
            await self._run(self._reclaim())

    async def budget_left(self, key_id: str, bucket: str, budget: int, period: tuple[float, float]) -> float:
        """What is left of a key's budget for one period, as kept (never summed per call): the balance plus what
        replicas hold of it, which is the budget less what the stored rows used. On the report connection, so
        a key asking for it cannot hold up key lookups. A balance no request has made yet is made here, from
        the rows' usage in the period (summed once, on the report connection too)."""
        this = (key_id, bucket)
        rows = await self._report(
            self._sql(
                "SELECT b.level + COALESCE((SELECT SUM(h.outstanding) FROM limit_holders h WHERE h.key_id = b.key_id "
                "AND h.dim = b.dim AND h.bucket = b.bucket), 0) FROM limit_balances b "
                "WHERE b.key_id = ? AND b.dim = 'budget' AND b.bucket = ?"
            ),
            this,
        )
        if rows:
            return float(rows[0][0])
        since, until = period
        spent = await self._report(
            self._sql(f"SELECT COALESCE(SUM({USED}), 0) FROM request_log WHERE key_id = ? AND started_at >= ?"),
            (key_id, since),
        )
        level = budget - float(spent[0][0])
        keep = self._sql(
            "INSERT INTO limit_balances (key_id, dim, bucket, level, granted, updated_at, starts_at, ends_at) "
            f"VALUES (?, 'budget', ?, ?, 0, {self.db_now}, ?, ?) ON CONFLICT (key_id, dim, bucket) DO NOTHING"
        )  # stamped by the database's clock, as the rate buckets are
        await self._run([(keep, (key_id, bucket, level, since, until))])
        return level

    async def budget_levels(self, balances: Sequence[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """What is left of each of the budget balances `balances` ((key, bucket) pairs), as `budget_left` reads
        it, in one statement on the report connection: the figures a scrape shows. A balance no request has made
        yet is not in the answer (nothing is made here: a scrape writes nothing)."""
        if not balances:
            return {}
        rows = await self._report(
            self._sql(
                "SELECT b.key_id, b.bucket, b.level + COALESCE((SELECT SUM(h.outstanding) FROM limit_holders h "
                "WHERE h.key_id = b.key_id AND h.dim = b.dim AND h.bucket = b.bucket), 0) FROM limit_balances b "
                f"WHERE b.dim = 'budget' AND b.key_id IN ({self.json_items}) AND b.bucket IN ({self.json_items})"
            ),
            (
                orjson.dumps(sorted({key for key, _ in balances})).decode(),
                orjson.dumps(sorted({bucket for _, bucket in balances})).decode(),
            ),
        )
        wanted = set(balances)  # the two lists match pairs that were not asked for too
        return {(key, bucket): float(left) for key, bucket, left in rows if (key, bucket) in wanted}

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

    async def give_back(
        self, key_id: str, kind: str, bucket: str, amount: float, cap: float | None = None, lease: float | None = None
    ) -> None:
        """Return an unused allowance (or, negative, charge usage beyond one) to a balance, never above `cap`.
        A budget's (`lease` given) comes off this replica's holding in the same transaction."""
        level = "level + ?" if cap is None else "(CASE WHEN level + ? > ? THEN ? ELSE level + ? END)"
        params: tuple[Any, ...] = (amount,) if cap is None else (amount, cap, cap, amount)
        sql = f"UPDATE limit_balances SET level = {level} WHERE key_id = ? AND dim = ? AND bucket = ?"
        steps: list[tuple[str, Params]] = [(self._sql(sql), (*params, key_id, kind, bucket))]
        if lease is not None:
            steps.append(self._hold("?", lease, (key_id, bucket), (-amount,)))
        await self._run(steps)

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
