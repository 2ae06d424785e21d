"""Tokens served per key over the last few minutes (a ring of time slots; pure, the caller gives the time).

What the console's queue view shows as each key's share: the VTC counters in `queue.py` are lifted and
forgotten as keys come and go, so they say who goes next, not who got what; this says who got what lately.
"""

from __future__ import annotations

SERVED_SPAN = 300.0  # seconds the window covers
SERVED_SLOTS = 10  # slots in the ring: the window moves on in steps of SERVED_SPAN / SERVED_SLOTS


class ServedWindow:
    """Tokens per key over the last `span` seconds, give or take one slot (memory: the keys served in it)."""

    __slots__ = ("_epochs", "_slots", "span", "step")

    def __init__(self, span: float = SERVED_SPAN, slots: int = SERVED_SLOTS) -> None:
        self.span = span
        self.step = span / slots
        self._slots: list[dict[str, int]] = [{} for _ in range(slots)]
        self._epochs = [-1] * slots  # which step each slot counts; an older one is stale

    def add(self, key: str, tokens: int, now: float) -> None:
        epoch = int(now // self.step)
        i = epoch % len(self._slots)
        if self._epochs[i] != epoch:  # the slot's last use was a whole window ago: it starts again
            self._epochs[i] = epoch
            self._slots[i] = {}
        slot = self._slots[i]
        slot[key] = slot.get(key, 0) + tokens

    def totals(self, now: float) -> dict[str, int]:
        """Tokens per key in the window that ends at `now`."""
        epoch, n = int(now // self.step), len(self._slots)
        out: dict[str, int] = {}
        for at, slot in zip(self._epochs, self._slots, strict=True):
            if epoch - n < at <= epoch:
                for key, tokens in slot.items():
                    out[key] = out.get(key, 0) + tokens
        return out
