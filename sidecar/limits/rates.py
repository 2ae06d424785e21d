"""Rates: a key's requests and tokens per minute held for the whole deployment, when replicas share a
PostgreSQL store. Each limit is a bucket in the store (capacity the per-minute limit, refilled by the
database's clock); replicas borrow allowances from it through the borrower (`sidecar.limits.borrowing`), so a key with
`rpm = 60` gets 60 a minute from all replicas together, within the allowances they hold. The local buckets of
`sidecar.limits.local` still apply (they never bind tighter); with SQLite (one replica) they are the only ones.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Iterator

from prometheus_client.metrics_core import Metric

from sidecar.errors import RateLimited, StoreUnavailable
from sidecar.keys.auth import Principal
from sidecar.limits.borrowing import FRACTION, Balance, Borrower, Hold, StoreDown
from sidecar.ops.series import counter

MAX_BALANCES = 10_000  # (key, kind, limit) balances remembered (`SharedRates._balance`); beyond, forgotten at once


class SharedRates:
    def __init__(self, borrower: Borrower, store_down: str = "local") -> None:
        self.borrower = borrower
        self.store = borrower.store
        self.store_down = StoreDown(store_down, "rpm/tpm")
        self._balances: dict[tuple[str, str, int], Balance] = {}

    def collect(self) -> Iterator[Metric]:
        yield counter(
            "sidecar_limit_local_rate_admissions",
            "Requests admitted by this replica's own rpm/tpm buckets while the shared store was unreachable.",
            (),
            {(): self.store_down.admitted},
        )

    async def take(self, p: Principal, tokens: int) -> Hold | None:
        """Take one request from the key's shared request bucket and `tokens` from its token bucket; the
        token hold (to settle with what the request used), or RateLimited with nothing taken. With the store
        unreachable and `store_down = local`: None (this replica's own buckets in `sidecar.limits.local` decide)."""
        try:
            return await self._take_both(p, tokens)
        except StoreUnavailable as exc:
            self.store_down.admit_locally(exc)  # or re-raised: the 503
            return None

    async def _take_both(self, p: Principal, tokens: int) -> Hold | None:
        kid = p.key_id
        if kid is None:
            return None
        request = None
        if p.rpm:
            request = await self._take(kid, "rpm", p.rpm, 1)
            if request is None:
                raise RateLimited(
                    f"Rate limit reached: {p.rpm} requests per minute (for this key across all replicas).",
                    type_="requests",
                    headers={"retry-after": str(max(1, math.ceil(60 / p.rpm)))},
                )
        need = min(tokens, p.tpm)
        admitted = False
        try:
            hold = await self._take(kid, "tpm", p.tpm, need) if p.tpm and need > 0 else None
            if p.tpm and need > 0 and hold is None:
                raise RateLimited(
                    f"Rate limit reached: {p.tpm} tokens per minute (for this key across all replicas); "
                    f"this request reserves {need}.",
                    type_="tokens",
                    headers={"retry-after": str(max(1, math.ceil(need * 60 / p.tpm)))},
                )
            admitted = True
        finally:
            if request is not None:  # spent when admitted; refused (or the store down): it goes back
                request.settle(1 if admitted else 0)
        return hold

    async def _take(self, kid: str, kind: str, limit: int, need: float) -> Hold | None:
        def borrow(want: float) -> Awaitable[tuple[float, float]]:
            return self.store.borrow_rate(kid, kind, float(limit), limit / 60.0, want, FRACTION)

        return await self.borrower.take(self._balance(kid, kind, limit), need, borrow)

    def headers(self, p: Principal, headers: dict[str, str]) -> None:
        """Put the cluster-wide figures in `headers`' x-ratelimit-remaining-* and -reset-*: what the store's
        bucket held at this replica's last borrow, refilled since, plus this replica's unspent allowance. It is
        low by at most what the other replicas hold unspent and high by at most what they borrowed since."""
        kid = p.key_id
        if kid is None:
            return
        for kind, limit, name in (("rpm", p.rpm, "requests"), ("tpm", p.tpm, "tokens")):
            share = self.borrower.share(self._balance(kid, kind, limit)) if limit else None
            if share is None or not share.left_at:
                continue
            rate = limit / 60.0
            store = min(float(limit), share.left + (self.borrower.clock() - share.left_at) * rate)
            left = max(0.0, min(float(limit), store + share.allowance))
            headers[f"x-ratelimit-limit-{name}"] = str(limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(int(left))
            headers[f"x-ratelimit-reset-{name}"] = f"{(limit - left) / rate:.3f}s"

    def _balance(self, kid: str, kind: str, limit: int) -> Balance:
        """The key's balance of `kind`, made once: four lookups a request (take and headers, rpm and tpm) would
        otherwise each format its bucket name and build the object again."""
        key = (kid, kind, limit)
        balance = self._balances.get(key)
        if balance is None:
            if len(self._balances) >= MAX_BALANCES:
                self._balances.clear()
            balance = self._balances[key] = Balance(kid, kind, f"{limit:g}", float(limit))
        return balance
