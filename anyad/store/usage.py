"""Usage reports from the ``usage`` table: requests, tokens, errors, cache hits and cost,
grouped by day, model or key, for ``GET /api/usage`` and ``anyad usage``."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeGuard

from anyad.store.connection import read_only

GroupBy = Literal["day", "model", "key"]
GROUPS: dict[str, str] = {"day": "strftime('%Y-%m-%d', at, 'unixepoch')", "model": "model", "key": "key"}


def is_group_by(value: str) -> TypeGuard[GroupBy]:
    return value in GROUPS


def parse_time(text: str) -> float:
    """Seconds since the epoch, or an ISO date / date and time (UTC unless it says)."""
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def report(path: Path, *, key: str | None = None, model: str | None = None, start: float | None = None,
           end: float | None = None, group_by: GroupBy = "day") -> list[dict[str, Any]]:
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    if not path.exists():
        return []
    conds: list[str] = []
    args: list[str | float] = []
    for column, value in (("key", key), ("model", model)):
        if value is not None:
            conds.append(f"{column} = ?")
            args.append(value)
    if start is not None:
        conds.append("at >= ?")
        args.append(start)
    if end is not None:
        conds.append("at < ?")
        args.append(end)
    where = ("WHERE " + " AND ".join(conds)) if conds else ""
    group = GROUPS[group_by]
    conn = read_only(path, timeout=10)
    try:
        rows = conn.execute(
            f"SELECT {group} AS g, count(*), sum(prompt_tokens), sum(completion_tokens), "
            "sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
            "sum(CASE WHEN cache IN ('hit', 'stale') THEN 1 ELSE 0 END), "
            f"sum(cost) FROM usage {where} GROUP BY g ORDER BY g", args).fetchall()
    except sqlite3.OperationalError:  # a database from before usage was recorded
        return []
    finally:
        conn.close()
    return [{group_by: g, "requests": n, "prompt_tokens": p or 0, "completion_tokens": c or 0,
             "total_tokens": (p or 0) + (c or 0), "errors": e or 0, "cache_hits": h or 0,
             "cost": round(cost, 6) if cost is not None else None} for g, n, p, c, e, h, cost in rows]
