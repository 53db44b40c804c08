"""The last hour, in memory, for the dashboard's charts: what happened in each few-second
step (requests by status class, tokens, times to first token, cache results, fallbacks)
and what the machine looked like then (queue depth, RAM, each GPU), with marks for
events (fallbacks, model loads and unloads).

Fed by ``Metrics`` as things happen (one place, beside the Prometheus counters), and
sampled for the gauges by the daemon every step; ``GET /api/timeline`` serves
``Timeline.json()``. Nothing is kept on disk: a restart starts an empty hour.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

STEP_S = 5.0
KEEP = 720  # steps: an hour at STEP_S
MAX_TTFTS = 1000  # first-token times kept per step for its percentiles
MAX_MARKS = 200


@dataclass
class Step:
    t: float  # its start (wall-clock seconds)
    requests: Counter[str] = field(default_factory=Counter)  # by status class: 2xx, 4xx, 5xx
    tokens: Counter[str] = field(default_factory=Counter)  # completion tokens by model
    ttfts: list[float] = field(default_factory=list)  # seconds
    cache: Counter[str] = field(default_factory=Counter)  # hit, miss, stale, bypass
    fallbacks: int = 0
    queue: int | None = None  # requests waiting for a model's slot, when sampled
    ram_used: int | None = None
    ram_total: int | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Timeline:
    def __init__(self, step_s: float = STEP_S, keep: int = KEEP, clock: Callable[[], float] = time.time) -> None:
        self.step_s = step_s
        self.clock = clock
        self.steps: deque[Step] = deque(maxlen=keep)
        self.marks: deque[dict[str, Any]] = deque(maxlen=MAX_MARKS)

    def _now(self) -> Step:
        t = math.floor(self.clock() / self.step_s) * self.step_s
        if not self.steps or self.steps[-1].t != t:
            self.steps.append(Step(t))
        return self.steps[-1]

    # -- as things happen ---------------------------------------------------------------------

    def request(self, status: int) -> None:
        self._now().requests[f"{status // 100}xx"] += 1

    def first_token(self, seconds: float) -> None:
        step = self._now()
        if len(step.ttfts) < MAX_TTFTS:
            step.ttfts.append(seconds)

    def tokens(self, model: str | None, completion_tokens: int) -> None:
        self._now().tokens[model or "?"] += completion_tokens

    def cache_result(self, result: str) -> None:
        self._now().cache[result] += 1

    def mark(self, kind: str, text: str) -> None:
        if kind == "fallback":
            self._now().fallbacks += 1
        self.marks.append({"t": self.clock(), "kind": kind, "text": text})

    def gauges(self, queue: int, ram_used: int | None, ram_total: int | None, gpus: list[dict[str, Any]]) -> None:
        step = self._now()
        step.queue, step.ram_used, step.ram_total, step.gpus = queue, ram_used, ram_total, gpus

    # -- what the dashboard reads -------------------------------------------------------------

    def json(self) -> dict[str, Any]:
        """Each step as rates and percentiles; the current step is the one still filling."""
        self._now()
        points = []
        for s in self.steps:
            looked_up = s.cache["hit"] + s.cache["stale"] + s.cache["miss"]
            p50, p95 = _percentile(s.ttfts, 0.5), _percentile(s.ttfts, 0.95)
            points.append({
                "t": s.t,
                "requests_per_s": {k: round(v / self.step_s, 3) for k, v in sorted(s.requests.items())},
                "requests": sum(s.requests.values()),
                "tokens_per_s": round(sum(s.tokens.values()) / self.step_s, 2),
                "tokens_per_s_by_model": {m: round(n / self.step_s, 2) for m, n in sorted(s.tokens.items())},
                "ttft_p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "ttft_p95_ms": None if p95 is None else round(p95 * 1000, 1),
                "cache_hit_rate": round((s.cache["hit"] + s.cache["stale"]) / looked_up, 3) if looked_up else None,
                "fallbacks": s.fallbacks, "queue": s.queue, "ram_used_bytes": s.ram_used,
                "ram_total_bytes": s.ram_total, "gpus": s.gpus})
        return {"step_s": self.step_s, "now": self.clock(), "points": points, "marks": list(self.marks)}
