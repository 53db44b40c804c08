"""The daemon's object graph: settings → backends → router, and their lifecycle."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from typing import Any, Callable

from aiohttp import web

from anyad.access import check_bind
from anyad.audit import AuditLog
from anyad.backend import Backend, backend_class
from anyad.cache import ResponseCache
from anyad.config import ModelPrice, ServerSettings, Settings
from anyad.errors import ConfigError
from anyad.keys import KeyRing
from anyad.limits import RateLimiter
from anyad.metrics import Metrics
from anyad.plugin_manager import Plugins
from anyad.pool import Pool
from anyad.pool import build as build_pool
from anyad.quotas import Quotas
from anyad.resources import DeviceProbe
from anyad.router import Router
from anyad.scheduler import Scheduler
from anyad.store import DB_NAME, Store, check_integrity
from anyad.stream import ChatRequest

log = logging.getLogger("anyad")

RETENTION_INTERVAL_S = 3600.0
# What a reload (SIGHUP) changes; any other difference in the new config needs a restart.
RETIRE_AFTER_S = 600.0  # a reload closes replaced providers at the latest this long after
RELOADABLE = ("providers", "pools", "routes", "router", "keys")
RELOADABLE_SERVER = ("api_keys", "allowed_origins", "allowed_hosts", "rate_limit_per_minute", "max_messages",
                     "max_prompt_chars", "log_level", "shutdown_grace_s", "allow_empty_reload")


def emptied(old: Settings, new: Settings) -> str | None:
    """What a reload from ``old`` to ``new`` would leave with nothing at all, or None.

    An emptied or truncated file parses as a valid config with nothing in it; applying it
    would drop every key and provider at once, so that takes saying so in the file.
    """
    if new.server.allow_empty_reload:
        return None

    def serves(s: Settings) -> bool:
        return bool(s.models or s.providers or s.routes or s.discovery.discover)

    gone = [what for what, had, has in (
        ("API keys", bool(old.server.api_keys or old.keys), bool(new.server.api_keys or new.keys)),
        ("models, providers and routes", serves(old), serves(new))) if had and not has]
    if not gone:
        return None
    return (f"{new.source or 'the new config'} has no {' and no '.join(gone)}; set server.allow_empty_reload = true "
            "in it if that is meant")


class Daemon:
    def __init__(self, settings: Settings, probe: DeviceProbe | None = None) -> None:
        """Build every backend; raises ConfigError (a missing model file, an unknown backend…).

        ``probe``: the device probe to use instead of the machine's own (tests hand in a
        recorded GPU); by default it is made at start, off the event loop.
        """
        self.settings = settings
        self.probe = probe
        self.plugins = Plugins(settings.plugins)
        self.backend_kinds: dict[str, type[Backend]] = {}
        self.plugins.register("anyad_register_backends", self._register_backend)
        self.scheduler = Scheduler(settings.scheduler, probe)
        self.local: dict[str, Backend] = {
            model_id: self._backend_class(ms.backend).from_model(model_id, ms, settings.defaults, self.scheduler,
                                                                data_dir=settings.resolved_data_dir)
            for model_id, ms in settings.models.items()}
        # Where each local model came from: the config, or a discovery source.
        self.sources: dict[str, str] = {model_id: "config" for model_id in self.local}
        if settings.discovery.discover:
            self._add_discovered(settings)
        providers = self._providers(settings)
        self.backends: list[Backend] = [*self.local.values(), *providers.values()]
        self.metrics = Metrics()
        self.metrics.pool_collector.pools = lambda: self.pools
        self.scheduler.listeners.append(self.metrics.model_event)
        self.pools = self._pools(settings)
        self.router = self._router(providers, settings, self.pools)
        # Access and limits, read by the middlewares on every request (a reload swaps them).
        self.keys = KeyRing(settings.server.api_keys, settings.keys, settings.resolved_data_dir / DB_NAME)
        self.quotas = Quotas(settings.resolved_data_dir / DB_NAME)
        # How `anyad serve` reads its config again (POST /api/reload); None elsewhere.
        self.load_settings: Callable[[], Settings] | None = None
        self.limiter = RateLimiter(settings.server.rate_limit_per_minute) if settings.server.rate_limit_per_minute \
            else None
        self._starting: list[asyncio.Task[None]] = []
        self.preloaded: asyncio.Task[None] | None = None  # done once the models to preload are loaded
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # What reloads replaced and are not closed yet (the daemon's close() closes them too).
        self._retiring: list[Backend | Pool] = []
        self.store: Store | None = None  # opened at start when the history, the cache or the audit is on
        self.cache: ResponseCache | None = None
        self.audit: AuditLog | None = None
        # Requests being answered, per config generation: a drain waits for all of them,
        # a reload closes the old providers once the requests that might use them are done.
        self.generation = 0
        self.active: Counter[int] = Counter()
        self._settled = asyncio.Event()
        self.draining = False
        self.started_at = time.time()

    def _add_discovered(self, settings: Settings) -> None:
        from anyad.config import ModelSettings
        from anyad.discovery import discover

        found = discover(settings.discovery, taken=set(self.local))
        for f in found:
            try:
                self.add_local(f.id, ModelSettings(path=f.path, mmproj=f.mmproj), f.source)
            except ConfigError as exc:  # one odd file must not stop the daemon
                log.warning("discovery: skipping %s (%s): %s", f.id, f.path, exc)
                continue
        if found:
            log.info("discovered %d model(s): %s", len(found), ", ".join(f"{f.id} ({f.source})" for f in found))

    def add_local(self, model_id: str, ms: Any, source: str) -> Backend:
        """Serve one more local model, at once (discovery at start; a door's pull, copy or
        create while running): the one way a local model joins. ``ms``: its ModelSettings;
        ``source``: where it came from (``config``, a discovery source, ``ollama``). Raises
        ConfigError for a file that cannot be served, and for an id already taken."""
        if model_id in self.local:
            raise ConfigError(f"{model_id!r} is already a model id")
        backend = self._backend_class(ms.backend).from_model(model_id, ms, self.settings.defaults, self.scheduler,
                                                                   data_dir=self.settings.resolved_data_dir)
        self.local[model_id] = backend
        self.sources[model_id] = source
        if hasattr(self, "backends"):  # after start-up: closed with the others
            self.backends.insert(len(self.local) - 1, backend)
        return backend

    async def remove_local(self, model_id: str, why: str = "removed") -> None:
        """Stop serving a local model: no new request reaches it; it unloads now, or once the
        requests it is serving are done, and then the scheduler forgets it and its backend is
        closed (a new model of this id meanwhile is another entry, and stays)."""
        backend = self.local.pop(model_id)
        self.sources.pop(model_id, None)
        if backend in self.backends:
            self.backends.remove(backend)
        if model_id not in self.scheduler.models:  # never registered (a backend without a scheduled engine)
            await backend.close()
            return
        await self.scheduler.unload_when_idle(model_id, why=why, retire=backend.close)

    def _register_backend(self, kind: str, cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(f"backend {kind!r} registered by a plugin is not an anyad Backend")
        self.backend_kinds[kind] = cls

    def _backend_class(self, kind: str) -> type[Backend]:
        return self.backend_kinds.get(kind) or backend_class(kind)

    def _providers(self, settings: Settings) -> dict[str, Backend]:
        providers: dict[str, Backend] = {}
        for name, ps in settings.providers.items():
            if name in self.local:
                raise ConfigError(f"providers.{name}: the name is already a model id")
            providers[name] = self._backend_class(ps.backend).from_provider(name, ps)
        return providers

    def _pools(self, settings: Settings, keep: dict[str, Pool] | None = None) -> dict[str, Pool]:
        """The pools of ``settings``; one whose settings are unchanged is ``keep``'s (its
        replicas' health, load, breakers and conversations stay)."""
        keep = keep or {}
        # A changed [router] rebuilds them too: their breakers take its thresholds.
        old = self.settings.pools if keep and self.settings.router == settings.router else {}
        return {name: keep[name] if name in keep and old.get(name) == ps
                else build_pool(name, ps, settings.router, self._backend_class)
                for name, ps in settings.pools.items()}

    def _router(self, providers: dict[str, Backend], settings: Settings, pools: dict[str, Pool]) -> Router:
        router = Router(self.local, providers, settings.routes, settings.router, pools)
        router.on_skip = self.metrics.fallback
        if self.plugins.remote_request:
            router.outbound = self._outbound
        return router

    async def _outbound(self, request: ChatRequest, target: Any) -> ChatRequest:
        return await self.plugins.guard("anyad_remote_request", request, "request", target=target, daemon=self)

    async def start(self) -> None:
        path = self.settings.resolved_data_dir / DB_NAME
        # First, before anything reads or writes it (the keys and quotas read it, whatever else is on).
        await asyncio.to_thread(check_integrity, path)
        # NVML and the engine's GPU support are read once, off the event loop.
        if self.probe is None:
            self.probe = await asyncio.to_thread(DeviceProbe)
        self.scheduler.probe = self.probe
        await asyncio.to_thread(self.probe.log_once)
        st = self.settings
        if st.history.enabled or st.cache.enabled or st.audit.enabled or st.usage.enabled:
            try:
                self.store = await asyncio.to_thread(Store, path)
            except (OSError, sqlite3.Error) as exc:
                raise ConfigError(f"cannot open the database {path}: {exc}") from None
            if self.settings.cache.enabled:
                self.cache = ResponseCache(self.store, self.settings.cache)
            if self.settings.audit.enabled:
                self.audit = AuditLog(self.store, self.settings.audit)
                self.scheduler.listeners.append(self.audit.model_event)
            if self.settings.history.enabled or self.audit is not None:
                self._starting.append(asyncio.create_task(self._retention()))
        # Preloading runs in the background: the listener answers /health at once
        # and /ready says when the models are usable. One after another, in config
        # order, so that placement sees each load's memory before the next.
        self.preloaded = asyncio.create_task(self._start_all())
        self._starting.append(self.preloaded)
        self._starting.append(asyncio.create_task(self._sample()))
        await self.plugins.notify("anyad_startup", lambda name: {"config": self.plugins.options(name)}, daemon=self)

    @property
    def usage(self) -> Store | None:
        """Where a row per request is recorded for usage reports and quotas, when on."""
        return self.store if self.settings.usage.enabled else None

    def price(self, backend: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        """What a remote target's tokens cost, where its provider (or pool: ``POOL@replica``)
        has a price for the model."""
        prices: dict[str, ModelPrice] | None = None
        provider, sep, model = backend.partition("/")
        if sep and provider in self.settings.providers:
            prices = self.settings.providers[provider].prices
        pool, at, _ = backend.partition("@")
        if at and pool in self.settings.pools:
            prices, model = self.settings.pools[pool].prices, self.settings.pools[pool].model or pool
        p = (prices.get(model) or prices.get("*")) if prices is not None else None
        if p is None:
            return None
        return (prompt_tokens * p.prompt + completion_tokens * p.completion) / 1e6

    @property
    def history(self) -> Store | None:
        """Where chat exchanges are recorded, when the history is on."""
        return self.store if self.settings.history.enabled else None

    async def _retention(self) -> None:
        h = self.settings.history
        history = self.settings.history.enabled and (h.max_age_days or h.max_conversations)
        audit = self.audit if self.settings.audit.max_age_days else None
        while self.store is not None and (history or audit is not None):
            try:
                if history:
                    gone = await asyncio.wrap_future(self.store.apply_retention(h.max_age_days, h.max_conversations))
                    if gone:
                        log.info("history retention: deleted %d conversation(s)", gone)
                if audit is not None:
                    await asyncio.wrap_future(audit.apply_retention())
            except Exception as exc:
                log.error("retention failed: %s", exc)
            await asyncio.sleep(RETENTION_INTERVAL_S)

    # -- requests in flight: drain and reload ---------------------------------------------------

    def begin(self) -> int:
        """A request starts; returns the config generation it runs under."""
        gen = self.generation
        self.active[gen] += 1
        return gen

    def end(self, gen: int) -> None:
        self.active[gen] -= 1
        if self.active[gen] <= 0:
            del self.active[gen]
            self._settled.set()

    @property
    def in_flight(self) -> int:
        return sum(self.active.values())

    async def settle(self, timeout: float, up_to: int | None = None) -> bool:
        """Wait until no request of generation ``up_to`` or older (all, when None) is in
        flight; False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        while any(n for g, n in self.active.items() if up_to is None or g <= up_to):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests (503) and wait up to ``grace_s`` for those in flight."""
        self.draining = True
        n = self.in_flight
        if n:
            log.info("draining: waiting up to %g s for %d request(s) in flight", grace_s, n)
        done = await self.settle(grace_s)
        if not done:
            log.warning("draining: %d request(s) still running after %g s; they are cut off", self.in_flight,
                        grace_s)
        return done

    def reload(self, new: Settings, actor: str = "daemon") -> list[str]:
        """Apply a new config's providers, routes, router settings, API keys and limits.

        Everything is built before anything is swapped, so an invalid config (raising
        ``ConfigError``), or one that would leave no keys or no models (``emptied``),
        leaves the running one whole. Requests in flight finish on the
        providers they started with; those are closed once the requests are done. Returns
        the settings that differ but need a restart (they keep their old values).
        """
        old = self.settings
        if (why := emptied(old, new)) is not None:
            raise ConfigError(why)
        providers: dict[str, Backend] = {}
        pools: dict[str, Pool] = {}
        try:
            providers = self._providers(new)
            pools = self._pools(new, keep=self.pools)
            router = self._router(providers, new, pools)
            # Still listening where it listens now: dropping the keys there must not open it up.
            check_bind(old.server.model_copy(update={"api_keys": new.server.api_keys}), bool(new.keys))
            keys = KeyRing(new.server.api_keys, new.keys, old.resolved_data_dir / DB_NAME)
        except BaseException:
            for backend in providers.values():
                self.spawn(backend.close())
            for pool in pools.values():
                if pool not in self.pools.values():
                    self.spawn(pool.close())
            raise
        if new.server.rate_limit_per_minute != old.server.rate_limit_per_minute:
            self.limiter = RateLimiter(new.server.rate_limit_per_minute) if new.server.rate_limit_per_minute \
                else None
        server = old.server.model_copy(update={k: getattr(new.server, k) for k in RELOADABLE_SERVER})
        merged = old.model_copy(update={**{k: getattr(new, k) for k in RELOADABLE}, "server": server})
        merged.source = new.source
        restart = [k for k in Settings.model_fields if k not in (*RELOADABLE, "server", "source")
                   and getattr(old, k) != getattr(new, k)]
        restart += [f"server.{k}" for k in ServerSettings.model_fields
                    if k not in RELOADABLE_SERVER and getattr(old.server, k) != getattr(new.server, k)]
        for name, breaker in self.router.breakers.items():  # an unchanged provider keeps its breaker's state
            provider = name.partition("/")[0]
            if provider in providers and old.providers.get(provider) == new.providers.get(provider):
                router.breakers[name] = breaker
        old_router, old_providers = self.router, [b for b in self.backends if b.remote]
        old_keys = self.keys
        old_pools = [p for p in self.pools.values() if p not in pools.values()]
        self.router, self.keys, self.settings, self.pools = router, keys, merged, pools
        old_keys.close()
        self.backends = [*self.local.values(), *providers.values()]
        if merged.server.log_level != old.server.log_level:
            logging.getLogger().setLevel(merged.server.log_level.upper())
        gen, self.generation = self.generation, self.generation + 1
        for pool in old_pools:  # its health no longer matters; its requests in flight finish
            self.spawn(pool.stop_watching())
        self._retiring.extend([*old_providers, *old_pools])
        self.spawn(self._retire(gen, old_router, [*old_providers, *old_pools]))
        for backend in providers.values():
            self.spawn(backend.start())
        for pool in pools.values():
            self.spawn(pool.start())
        log.info("config reloaded from %s: %d provider(s), %d route(s)%s", new.source or "settings",
                 len(providers), len(new.routes),
                 f"; needs a restart to apply: {', '.join(restart)}" if restart else "")
        if self.audit is not None:
            self.audit.action(actor, "config.reload", str(new.source or ""),
                              {"providers": sorted(providers), "routes": [r.name for r in new.routes],
                               **({"needs_restart": restart} if restart else {})})
        return restart

    async def reload_from(self, load: Callable[[], Settings], actor: str = "daemon") -> bool:
        """Read the config again (off the event loop) and apply it; False, with the reason
        logged and audited, when it is invalid: the running one then stays as it was."""
        async with self._reloading:
            try:
                new = await asyncio.to_thread(load)
                self.reload(new, actor)
            except Exception as exc:  # whatever the new config breaks, the running one stays
                why = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                log.error("reload refused; the running configuration stays: %s", why)
                if self.audit is not None:
                    self.audit.action(actor, "config.reload_rejected", None, {"error": why})
                return False
            return True

    async def _retire(self, gen: int, router: Router, providers: list[Backend | Pool]) -> None:
        """Close what a reload replaced, once the requests that may still use it are done."""
        await self.settle(RETIRE_AFTER_S, up_to=gen)
        await router.close()
        await asyncio.gather(*(b.close() for b in providers), return_exceptions=True)
        self._retiring = [b for b in self._retiring if b not in providers]

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background; cancelled when the daemon closes."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_all(self) -> None:
        for pool in self.pools.values():
            await pool.start()
        for backend in self.backends:
            try:
                await backend.start()
            except Exception as exc:  # a failed preload is retried by the first request
                log.error("%s", getattr(exc, "message", exc))

    def ready(self) -> tuple[bool, dict[str, bool]]:
        """Ready when every local model is usable; remote ones answer for themselves."""
        states = {model_id: b.ready() for model_id, b in self.local.items()}
        return all(states.values()), states

    def sample_gauges(self) -> None:
        snap = self.probe.snapshot() if self.probe is not None else None
        queue = sum(v.waiting for v in self.scheduler.snapshot().values())
        gpus = [{"index": g.index, "name": g.name, "used_bytes": g.used_bytes, "total_bytes": g.total_bytes,
                 "utilization_pct": g.utilization_pct} for g in snap.gpus] if snap is not None else []
        self.metrics.timeline.gauges(queue, snap.ram_total_bytes - snap.ram_available_bytes if snap else None,
                                     snap.ram_total_bytes if snap else None, gpus)

    async def _sample(self) -> None:
        """The gauges every step, so that the hour has them while nobody watches."""
        while True:
            await asyncio.sleep(self.metrics.timeline.step_s)
            try:
                await asyncio.to_thread(self.sample_gauges)  # NVML and psutil reads take a moment
            except Exception:  # a failed read must not end the sampling
                log.exception("sampling the devices for the timeline failed")

    def status(self) -> dict:
        """Devices, local models (placement, memory, expiry, queues), breakers, offline state."""
        devices = self.probe.snapshot().as_dict() if self.probe is not None else None
        return {"devices": devices, "models": {model_id: b.status() for model_id, b in self.local.items()},
                "scheduler": {"max_loaded_models": self.settings.scheduler.max_loaded_models,
                              "loaded": sum(1 for v in self.scheduler.snapshot().values() if v.loaded)},
                **self.router.status()}

    async def close(self) -> None:
        await self.plugins.notify("anyad_shutdown", daemon=self)
        for t in [*self._starting, *self._tasks]:
            t.cancel()
        await self.router.close()
        await self.scheduler.close()
        if self.store is not None:
            # Replies already sent are committed before the process goes.
            await asyncio.to_thread(self.store.close)
        if self.probe is not None:
            self.probe.close()
        self.keys.close()
        await asyncio.gather(*(b.close() for b in [*self.backends, *self.pools.values(), *self._retiring]),
                             return_exceptions=True)


# The daemon an application serves, for its handlers and middlewares: ``request.app[DAEMON]``
# (``anyad.server.gateway_app`` sets it on every listener's application).
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon", Daemon)
