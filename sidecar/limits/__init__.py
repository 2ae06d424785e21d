"""Limits: admission, the only place that decides whether a request may go to the upstream and what it holds.
Its face is `admission.Limits` (`reserve` what a call costs, `admit` it: the shared slot, the budget, the
shared rates, then the local lease, undone in reverse when one refuses) and the `admission.Lease` an admitted
request settles and releases once; `budgets` gives the reports a budget's remaining tokens (`budget_fields`,
`from_store`) and `periods` the period vocabulary keys are checked against. Inside: `local` (this replica's
per-key buckets and the global cap), `saturation` (that cap following the engine's metrics page), `borrowing`
(allowances borrowed from the store's balances), `budgets`, `rates` and `slots` (the limits that hold for every
replica sharing PostgreSQL), `gauges` (the budget figures `/metrics` shows).
"""

__all__ = ["admission", "budgets", "periods"]
