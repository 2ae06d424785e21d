"""Periods: a calendar `day`, `week` (from Monday) or `month` in `limits.timezone`, or a plain duration (`10m`,
`1h`: windows aligned to the epoch). Pure arithmetic, no I/O.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from sidecar.config import duration

CALENDAR = ("day", "week", "month")


def valid_period(period: str) -> bool:
    return period in CALENDAR or (duration(period) or 0) >= 1


def period_bounds(period: str, now: float, tz: ZoneInfo) -> tuple[float, float]:
    """(start, end) in epoch seconds of the period `now` falls in."""
    if period not in CALENDAR:
        length = duration(period) or 0.0
        start = math.floor(now / length) * length
        return start, start + length
    today = datetime.fromtimestamp(now, tz).date()
    if period == "day":
        first, following = today, today + timedelta(days=1)
    elif period == "week":
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        following = (first + timedelta(days=32)).replace(day=1)
    return _midnight(first, tz), _midnight(following, tz)


def _midnight(day: date, tz: ZoneInfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
