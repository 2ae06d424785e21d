"""Rows as the writer stores them: one JSON line each, and the copy of a row a database will take.

`sanitise` is the second try for a row the store refused: text made valid UTF-8 and bounded, integers kept
within 64 bits, floats finite. A line that is no row at all is left as it was, to be dead-lettered as found.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

Row = dict[str, Any]
Line = bytes  # one row, JSON-encoded: what the journal holds and what the store unpacks
_MAX_TEXT = 4096
_INT64 = 2**63 - 1


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        # PostgreSQL's text refuses NUL; lone surrogates are not UTF-8: neither may cost a row its place.
        return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")[:_MAX_TEXT]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -_INT64 <= value <= _INT64:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sanitise(row: Row) -> Row:
    """A copy a database will take: valid UTF-8 text of bounded size, 64-bit integers, finite floats."""
    return {name: _clean(value) for name, value in row.items()}


def dump(row: Row) -> bytes:
    try:
        return orjson.dumps(row)
    except (orjson.JSONEncodeError, TypeError):
        return orjson.dumps(sanitise(row), default=str)


def sanitised_line(line: Line) -> Line:
    """The line made storable, for a second try; a line that is no row at all stays as it is (and is
    dead-lettered as it was found)."""
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    return dump(sanitise(row)) if isinstance(row, dict) else line
