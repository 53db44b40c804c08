"""The daemon's object graph: settings → backends → router, and their lifecycle."""

from __future__ import annotations

import asyncio
import logging

from anyad.backend import Backend, backend_class
from anyad.config import Settings
from anyad.router import Router

log = logging.getLogger("anyad")


class Daemon:
    def __init__(self, settings: Settings) -> None:
        """Build every backend; raises ConfigError (a missing model file, an unknown backend…)."""
        self.settings = settings
        self.backends: list[Backend] = []
        for model_id, ms in settings.models.items():
            cls = backend_class(ms.backend)
            self.backends.append(cls.from_settings(model_id, ms, settings.defaults))
        self.router = Router(self.backends)
        self._starting: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # Preloading runs in the background: the listener answers /health at once
        # and /ready says when the models are usable.
        for b in self.backends:
            self._starting.append(asyncio.create_task(self._start_one(b)))

    async def _start_one(self, backend: Backend) -> None:
        try:
            await backend.start()
        except Exception as exc:  # a failed preload is retried by the first request
            log.error("%s", getattr(exc, "message", exc))

    def ready(self) -> tuple[bool, dict[str, bool]]:
        states = {info.id: b.ready() for b in self.backends for info in b.models()}
        return all(states.values()), states

    async def close(self) -> None:
        for t in self._starting:
            t.cancel()
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)
