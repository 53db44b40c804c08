"""Offline detection: when every remote target fails at the network level, stop trying them.

While offline, the router skips remote targets at once (no connect timeout per
request) and a background probe tries a plain TCP connection to each provider
every few seconds; the first that connects, or any remote success, ends it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("anyad.offline")


class Connectivity:
    def __init__(self, probe_interval_s: float = 10.0, probe_timeout_s: float = 2.0) -> None:
        self.offline = False
        self.since: float | None = None
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.addresses: list[tuple[str, int]] = []
        self._task: asyncio.Task[None] | None = None

    def went_offline(self, why: str) -> None:
        if not self.offline:
            self.offline = True
            self.since = time.time()
            log.warning("offline: %s; remote targets are skipped until the network is back", why)
            if self.addresses and (self._task is None or self._task.done()):
                self._task = asyncio.create_task(self._probe_loop(), name="offline-probe")

    def came_online(self) -> None:
        if self.offline:
            self.offline = False
            self.since = None
            log.info("online again: remote targets are used")

    async def _probe_loop(self) -> None:
        while self.offline:
            await asyncio.sleep(self.probe_interval_s)
            for host, port in self.addresses:
                if await self._reachable(host, port):
                    self.came_online()
                    return

    async def _reachable(self, host: str, port: int) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.probe_timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True

    def snapshot(self) -> dict[str, Any]:
        return {"offline": self.offline, "since": self.since}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
