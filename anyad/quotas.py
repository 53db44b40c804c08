"""Per-key quotas: tokens per day and per month (UTC), requests per minute.

Tokens are counted from the usage each reply reports (prompt + completion, local and
remote alike; a cached answer costs nothing), once per client request however many
targets it took. The counters start from the ``usage`` table, so a restart forgets
nothing; a request is refused (429 ``quota_exceeded``, ``Retry-After`` at the next
reset) only before it starts, so concurrent requests of one key overrun a quota by at
most the requests already in flight. Time comes from ``clock`` (tests drive it).
"""

from __future__ import annotations

import calendar
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from anyad.errors import QuotaExceeded
from anyad.keys import Identity
from anyad.limits import RateLimiter
from anyad.store import read_only

DAY = 86400


def day_start(t: float) -> float:
    return t - t % DAY


def month_start(t: float) -> float:
    g = time.gmtime(t)
    return float(calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0)))


def next_month(t: float) -> float:
    g = time.gmtime(t)
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass(slots=True)
class _Counter:
    day: float
    day_tokens: int
    month: float
    month_tokens: int


class Quotas:
    def __init__(self, db_path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.db_path = db_path
        self.clock = clock
        self.counters: dict[str, _Counter] = {}
        self.rates: dict[str, RateLimiter] = {}

    def _used_since(self, key: str, since: float) -> int:
        if self.db_path is None or not self.db_path.exists():
            return 0
        try:
            conn = read_only(self.db_path, timeout=5.0)  # sqlite3's default wait: a key's first request waits
            try:
                (n,) = conn.execute("SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage "
                                    "WHERE key = ? AND at >= ? AND coalesce(cache, '') NOT IN ('hit', 'stale')",
                                    (key, since)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return 0
        return int(n)

    def _counter(self, name: str) -> _Counter:
        now = self.clock()
        c = self.counters.get(name)
        if c is None:
            d, m = day_start(now), month_start(now)
            c = self.counters[name] = _Counter(d, self._used_since(name, d), m, self._used_since(name, m))
        if now >= c.day + DAY:
            c.day, c.day_tokens = day_start(now), 0
        if now >= next_month(c.month):
            c.month, c.month_tokens = month_start(now), 0
        return c

    def check(self, ident: Identity) -> None:
        """Before a request starts: refuse it when the key is over a quota."""
        if ident.requests_per_minute:
            rate = self.rates.get(ident.name)
            if rate is None or rate.capacity != ident.requests_per_minute:
                rate = self.rates[ident.name] = RateLimiter(ident.requests_per_minute, clock=self.clock)
            ok, _, _, retry = rate.take(ident.name)
            if not ok:
                raise QuotaExceeded(f"the key {ident.name!r} may make {ident.requests_per_minute} requests per "
                                    f"minute; retry in {retry} s", retry_after=retry)
        if not ident.limited:
            return
        c = self._counter(ident.name)
        now = self.clock()
        if ident.tokens_per_day and c.day_tokens >= ident.tokens_per_day:
            retry = max(1, int(c.day + DAY - now))
            raise QuotaExceeded(f"the key {ident.name!r} has used its {ident.tokens_per_day} tokens for today "
                                f"(UTC); the quota resets in {retry} s", retry_after=retry)
        if ident.tokens_per_month and c.month_tokens >= ident.tokens_per_month:
            retry = max(1, int(next_month(c.month) - now))
            raise QuotaExceeded(f"the key {ident.name!r} has used its {ident.tokens_per_month} tokens for this "
                                f"month (UTC); the quota resets in {retry} s", retry_after=retry)

    def remaining(self, ident: Identity) -> int | None:
        """Tokens left before the nearer quota, or None for a key without token quotas."""
        if not ident.limited:
            return None
        c = self._counter(ident.name)
        left = []
        if ident.tokens_per_day:
            left.append(ident.tokens_per_day - c.day_tokens)
        if ident.tokens_per_month:
            left.append(ident.tokens_per_month - c.month_tokens)
        return max(0, min(left))

    def add(self, ident: Identity, tokens: int) -> None:
        """A request's tokens, once, when its reply is done."""
        if tokens <= 0 or not ident.limited:
            return
        c = self._counter(ident.name)
        c.day_tokens += tokens
        c.month_tokens += tokens
