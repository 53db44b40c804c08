"""Plain-text tables and sizes for the CLI's output (one way for every command)."""

from __future__ import annotations

from typing import Iterable

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float | None) -> str:
    """Bytes for a person: "217.4 KiB", "1.5 GiB"; "-" when unknown."""
    if n is None:
        return "-"
    for unit in UNITS:
        if n < 1024 or unit == UNITS[-1]:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def table(rows: list[list[str]], *, indent: str = "", right: Iterable[int] = ()) -> list[str]:
    """Columns padded to their widest cell (``right``: the columns aligned right), two
    spaces apart; the first row is the header."""
    right = set(right)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def when(ts: float | None) -> str:
    """A timestamp in local time to the minute; "-" when there is none."""
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"
