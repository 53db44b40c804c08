"""Circuit breakers for remote targets.

closed → (N consecutive failures) → open → (cooldown) → half-open: one probe
request goes through; success closes the breaker, failure opens it again.
While open, the router skips the target at once instead of waiting on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Breaker:
    failures_to_open: int = 3
    cooldown_s: float = 30.0
    state: str = "closed"  # closed | open | half_open
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    last_error: str | None = None
    clock: Any = field(default=time.monotonic, repr=False)

    def allow(self) -> bool:
        """May a request go to this target now? In half-open, only one probe at a time."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.cooldown_s:
                return False
            self.state = "half_open"
            self.probing = False
        if self.probing:
            return False
        self.probing = True
        return True

    def blocked(self) -> bool:
        """Open and still cooling down (``allow`` would refuse), without claiming a probe."""
        return self.state == "open" and self.clock() - self.opened_at < self.cooldown_s

    def success(self) -> None:
        self.state, self.failures, self.probing = "closed", 0, False

    def failure(self, reason: str) -> None:
        self.last_error = reason
        self.failures += 1
        self.probing = False
        if self.state == "half_open" or self.failures >= self.failures_to_open:
            self.state = "open"
            self.opened_at = self.clock()

    def release(self) -> None:
        """A probe that ended neither way (e.g. the client left): let the next one try."""
        self.probing = False

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "consecutive_failures": self.failures,
                               "last_error": self.last_error}
        if self.state == "open":
            out["retry_in_s"] = round(max(0.0, self.cooldown_s - (self.clock() - self.opened_at)), 1)
        return out
