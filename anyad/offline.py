"""Offline detection: when no remote provider can be reached, stop trying them.

A provider whose connection is refused, or that answers with an error, proves the
network is up: that target is its circuit breaker's business, not a reason to skip
every provider. The machine counts as offline only once every configured provider's
latest attempt failed to reach its host at all (a connect timeout, an unknown host,
an unreachable network). While offline, the router skips remote targets at once (no
connect timeout per request) and a background probe tries a plain TCP connection to
each provider every few seconds; the first host that answers (accepting or refusing),
or any remote success, ends it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import Any

log = logging.getLogger("anyad.offline")


def refused(exc: BaseException | None) -> bool:
    """Was this connect error a refusal? (A host with several addresses that all refused
    raises a plain OSError carrying ECONNREFUSED, not ConnectionRefusedError.)"""
    return isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED


class Connectivity:
    def __init__(self, addresses: dict[str, tuple[str, int] | None], probe_interval_s: float = 10.0,
                 probe_timeout_s: float = 2.0) -> None:
        """``addresses``: every remote provider by name, and where the probe knocks for it."""
        self.offline = False
        self.since: float | None = None
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.addresses = addresses
        # Providers whose latest attempt did not reach their host, and why.
        self.unreachable: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    def reached(self, provider: str) -> None:
        """Something at ``provider``'s address answered: the network is up."""
        self.unreachable.pop(provider, None)
        self.came_online()

    def not_reached(self, provider: str, why: str) -> None:
        """``provider``'s host could not be reached; offline once that holds for every provider."""
        self.unreachable[provider] = why
        if self.unreachable.keys() >= self.addresses.keys():
            self.went_offline("; ".join(self.unreachable.values()))
        elif not self.offline and (self._task is None or self._task.done()):
            # The others have not failed lately: knock on their doors, off the request path.
            self._task = asyncio.create_task(self._check_others(), name="offline-check")

    async def _check_others(self) -> None:
        for provider, address in list(self.addresses.items()):
            if provider in self.unreachable or address is None:
                continue
            if await self._answers(*address):
                return
            self.not_reached(provider, f"{provider}: no answer from {address[0]}:{address[1]}")

    def went_offline(self, why: str) -> None:
        if not self.offline:
            self.offline = True
            self.since = time.time()
            log.warning("offline: %s; remote targets are skipped until the network is back", why)
            task = self._task
            if any(self.addresses.values()) and (task is None or task.done() or task is asyncio.current_task()):
                self._task = asyncio.create_task(self._probe_loop(), name="offline-probe")

    def came_online(self) -> None:
        if self.offline:
            self.offline = False
            self.since = None
            log.info("online again: remote targets are used")

    async def _probe_loop(self) -> None:
        while self.offline:
            await asyncio.sleep(self.probe_interval_s)
            for provider, address in self.addresses.items():
                if address is not None and await self._answers(*address):
                    self.reached(provider)
                    return

    async def _answers(self, host: str, port: int) -> bool:
        """Does the host answer at all? A refusal counts: it came over the network."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.probe_timeout_s)
        except asyncio.TimeoutError:
            return False
        except OSError as exc:
            return refused(exc)
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
