"""Tables: rows of plain data shown to people (aligned text, ISO times in UTC, `-` for nothing) or to
spreadsheets (CSV, with cells that could run as formulas defused). Used by the CLI and the CSV listings."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

EMPTY = "-"


def iso(epoch: float | None) -> str:
    """Epoch seconds as an ISO 8601 time in UTC to the second (`2026-11-29T08:48:36Z`); `-` for none."""
    if epoch is None:
        return EMPTY
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cell(value: Any) -> str:
    """A value as a table shows it: nothing as `-`, lists comma-separated, never Python's `None`."""
    if value is None or value == "":
        return EMPTY
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or EMPTY
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def text_table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """Aligned columns under a header line; numbers right-aligned."""
    body = [[cell(row.get(c)) for c in columns] for row in rows]
    table = [list(columns), *body]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    numeric = [bool(body) and all(_number(line[i]) for line in body) for i in range(len(columns))]
    lines = []
    for line in table:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(line, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _number(text: str) -> bool:
    return text == EMPTY or text.replace(".", "", 1).lstrip("-").isdigit()


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never runs: a string starting with `=`, `+`, `-`, `@`, tab or CR (a
    formula, in Excel, LibreOffice and Google Sheets) gets a leading `'` (OWASP's advice for CSV injection)."""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))  # joined first: the joined text is what a spreadsheet reads
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
