"""Table cells: how a missing figure and a ratio are written, the same in every section's table."""

from __future__ import annotations

from typing import Any


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def num(value: float | None, digits: int = 0) -> str:
    """A figure with thousands separators (req/s), or ``-``."""
    return "-" if value is None else f"{value:,.{digits}f}"
