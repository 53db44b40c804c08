"""The daemon's object graph: settings → backends → router, and their lifecycle."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from anyad.backend import Backend, backend_class
from anyad.cache import ResponseCache
from anyad.config import Settings
from anyad.errors import ConfigError
from anyad.resources import DeviceProbe
from anyad.router import Router
from anyad.scheduler import Scheduler
from anyad.store import DB_NAME, Store

log = logging.getLogger("anyad")

RETENTION_INTERVAL_S = 3600.0


class Daemon:
    def __init__(self, settings: Settings, probe: DeviceProbe | None = None) -> None:
        """Build every backend; raises ConfigError (a missing model file, an unknown backend…).

        ``probe``: the device probe to use instead of the machine's own (tests hand in a
        recorded GPU); by default it is made at start, off the event loop.
        """
        self.settings = settings
        self.probe = probe
        self.scheduler = Scheduler(settings.scheduler, probe)
        local: dict[str, Backend] = {}
        for model_id, ms in settings.models.items():
            local[model_id] = backend_class(ms.backend).from_model(model_id, ms, settings.defaults, self.scheduler)
        providers: dict[str, Backend] = {}
        for name, ps in settings.providers.items():
            if name in local:
                raise ConfigError(f"providers.{name}: the name is already a model id")
            providers[name] = backend_class(ps.backend).from_provider(name, ps)
        self.backends: list[Backend] = [*local.values(), *providers.values()]
        self.local = local
        self.router = Router(local, providers, settings.routes, settings.router)
        self._starting: list[asyncio.Task[None]] = []
        self.store: Store | None = None  # opened at start when the history or the cache is enabled
        self.cache: ResponseCache | None = None

    async def start(self) -> None:
        # NVML and the engine's GPU support are read once, off the event loop.
        if self.probe is None:
            self.probe = await asyncio.to_thread(DeviceProbe)
        self.scheduler.probe = self.probe
        await asyncio.to_thread(self.probe.log_once)
        if self.settings.history.enabled or self.settings.cache.enabled:
            path = self.settings.resolved_data_dir / DB_NAME
            try:
                self.store = await asyncio.to_thread(Store, path)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"cannot open the database {path}: {exc}") from None
            if self.settings.cache.enabled:
                self.cache = ResponseCache(self.store, self.settings.cache, self.router)
            if self.settings.history.enabled:
                self._starting.append(asyncio.create_task(self._retention()))
        # Preloading runs in the background: the listener answers /health at once
        # and /ready says when the models are usable. One after another, in config
        # order, so that placement sees each load's memory before the next.
        self._starting.append(asyncio.create_task(self._start_all()))

    @property
    def history(self) -> Store | None:
        """Where chat exchanges are recorded, when the history is on."""
        return self.store if self.settings.history.enabled else None

    async def _retention(self) -> None:
        h = self.settings.history
        while self.store is not None and (h.max_age_days or h.max_conversations):
            try:
                gone = await asyncio.wrap_future(self.store.apply_retention(h.max_age_days, h.max_conversations))
                if gone:
                    log.info("history retention: deleted %d conversation(s)", gone)
            except Exception as exc:
                log.error("history retention failed: %s", exc)
            await asyncio.sleep(RETENTION_INTERVAL_S)

    async def _start_all(self) -> None:
        for backend in self.backends:
            try:
                await backend.start()
            except Exception as exc:  # a failed preload is retried by the first request
                log.error("%s", getattr(exc, "message", exc))

    def ready(self) -> tuple[bool, dict[str, bool]]:
        """Ready when every local model is usable; remote ones answer for themselves."""
        states = {model_id: b.ready() for model_id, b in self.local.items()}
        return all(states.values()), states

    def status(self) -> dict:
        """Devices, local models (placement, memory, expiry, queues), breakers, offline state."""
        devices = self.probe.snapshot().as_dict() if self.probe is not None else None
        return {"devices": devices, "models": {model_id: b.status() for model_id, b in self.local.items()},
                "scheduler": {"max_loaded_models": self.settings.scheduler.max_loaded_models,
                              "loaded": sum(1 for e in self.scheduler.models.values() if e.state == "loaded")},
                **self.router.status()}

    async def close(self) -> None:
        for t in self._starting:
            t.cancel()
        await self.router.close()
        await self.scheduler.close()
        if self.store is not None:
            # Replies already sent are committed before the process goes.
            await asyncio.to_thread(self.store.close)
        if self.probe is not None:
            self.probe.close()
        await asyncio.gather(*(b.close() for b in self.backends), return_exceptions=True)
