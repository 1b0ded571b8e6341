"""How step 4 and the experiments write numbers: one number format, one p-value format, one mark for a missing
value, one compact count. Reports, tables, console lines and figure labels all use these.

- ``format_number``: ``digits`` decimals (0.033, 0.45); a non-zero value too small for them gets ``digits``
  significant digits instead (0.000123, not 0.000); integers as they are.
- ``format_p``: a permutation p-value with two significant digits (0.15, 0.012); at its floor 1 / (n_perm + 1)
  it is an upper bound, written "≤0.005"; in running text ``p_text`` gives "p=0.15" / "p≤0.005".
- ``MISSING`` ("n/a") for None and NaN, everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = [
    "MISSING",
    "format_count",
    "format_interval",
    "format_number",
    "format_p",
    "is_missing",
    "p_text",
    "with_interval",
]

MISSING = "n/a"


def is_missing(value) -> bool:
    """None, or a number that is NaN."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def format_number(value, digits: int = 3, signed: bool = False) -> str:
    """``digits`` decimals; a non-zero value below 10**-digits in magnitude with ``digits`` significant digits;
    integers unchanged; strings as they are; None or NaN: MISSING. ``signed``: a leading + on positive values."""
    if is_missing(value):
        return MISSING
    if isinstance(value, (str, bool)):
        return str(value)
    sign = "+" if signed else ""
    if isinstance(value, numbers.Integral):
        return f"{int(value):{sign}d}"
    value = float(value)
    if value != 0 and abs(value) < 10.0**-digits:
        return f"{value:{sign}.{digits}g}"
    return f"{value:{sign}.{digits}f}"


def format_interval(values, digits: int = 3, signed: bool = False) -> str:
    """'[low, high]' with format_number; MISSING without an interval."""
    if not values or any(is_missing(value) for value in values):
        return MISSING
    low, high = values
    return f"[{format_number(low, digits, signed)}, {format_number(high, digits, signed)}]"


def with_interval(value, interval, digits: int = 3, signed: bool = False) -> str:
    """'value [low, high]', or the value alone without an interval."""
    text = format_number(value, digits, signed)
    if not interval or any(is_missing(bound) for bound in interval):
        return text
    return f"{text} {format_interval(interval, digits)}"


def _at_floor(value: float, n_perm: int | None) -> bool:
    return bool(n_perm) and value <= 1.0 / (n_perm + 1) + 1e-12


def format_p(value, n_perm: int | None = None) -> str:
    """A permutation p-value, two significant digits; '≤' at the floor 1/(n_perm+1) (n_perm known); MISSING."""
    if is_missing(value):
        return MISSING
    value = float(value)
    return f"≤{value:.2g}" if _at_floor(value, n_perm) else f"{value:.2g}"


def p_text(value, n_perm: int | None = None) -> str:
    """format_p for running text: 'p=0.15', 'p≤0.005', 'p n/a'."""
    text = format_p(value, n_perm)
    if text == MISSING:
        return f"p {MISSING}"
    return f"p{text}" if text.startswith("≤") else f"p={text}"


def format_count(n: float) -> str:
    """Compact count label: 987, 1.2k, 34.5k, 123k, 1.2M, 3.4B."""
    n = float(n)
    if n < 0:
        return "-" + format_count(-n)
    if n < 1000:
        return f"{n:.0f}"
    for scale, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "B")):
        v = n / scale
        text = f"{v:.1f}" if v < 99.95 else f"{v:.0f}"
        if float(text) < 1000 or suffix == "B":
            if text.endswith(".0"):
                text = text[:-2]
            return text + suffix
    raise AssertionError("unreachable")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def share_floor(share: float) -> str:
    """A share in percent, rounded down to 0.1: 0.8994 is 89.9%, never the 90% it falls short of."""
    return f"{math.floor(share * 1000 + 1e-9) / 10:.1f}%"
