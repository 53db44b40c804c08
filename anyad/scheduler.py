"""Admission to models: per-model slots and bounded wait queues.

A local model's worker runs one generation at a time. Requests beyond that wait
in a queue of bounded length; when it is full the request is refused at once
with 429 and a ``Retry-After`` estimated from how long requests have recently
held the slot, rather than piling up unbounded latency.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from anyad.errors import QueueFull


class ModelQueue:
    def __init__(self, name: str, slots: int = 1, max_waiting: int = 16) -> None:
        self.name = name
        self.slots = slots
        self.max_waiting = max_waiting
        self._sem = asyncio.Semaphore(slots)
        self.waiting = 0
        self.active = 0
        self._avg_hold_s = 5.0  # moving average of slot hold time, for Retry-After

    def retry_after(self) -> int:
        return max(1, math.ceil(self._avg_hold_s * (self.waiting + 1) / self.slots))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_waiting:
            raise QueueFull(f"model {self.name!r} is busy and its queue is full ({self.max_waiting} waiting); "
                            "retry later", retry_after=self.retry_after())
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.active -= 1
            self._avg_hold_s = 0.8 * self._avg_hold_s + 0.2 * (time.monotonic() - started)
            self._sem.release()
