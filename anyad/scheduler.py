"""The one owner of local models' lifecycle: where they load, when, and who waits.

Every request for a local model goes through ``Scheduler.use(name)``, which

1. admits it to the model's queue: ``parallel`` requests run at once, up to
   ``max_queue`` more wait (beyond that: 429 with ``Retry-After``), and a wait
   longer than ``queue_timeout_s`` is a 503; a client that hangs up while
   waiting leaves the queue at once;
2. makes sure the model is loaded: placement is planned from what the devices
   report now (``anyad.placement``), idle models are unloaded, least recently
   used first, when the model count limit or memory asks for it, and after such
   an unload the load waits (bounded) until the device reports the memory free;
   a load that fails on the GPU is retried with half the layers, then on the CPU;
3. on release, starts the model's keep-alive clock: ``0`` unloads it at once,
   ``inf`` never, anything else after that many idle seconds.

Loads and unloads happen one at a time under one lock, so two decisions never
plan with the same free memory; requests for a model that is already loaded
never touch that lock. A model that is generating or has requests waiting is
never unloaded.

What anything else reads of the models (``/api/status``, ``/metrics``, the doors'
lists of loaded models, plugins) is ``Scheduler.snapshot()``: frozen ``ModelView``
copies, the stable surface; the ``ModelEntry`` objects in ``Scheduler.models`` are the
scheduler's own working state and may change between versions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from anyad.config import ModelPolicy, SchedulerSettings
from anyad.errors import AnyadError, LoadFailed, QueueFull, Unavailable
from anyad.memory import Estimate
from anyad.placement import InsufficientMemory, Placement, plan
from anyad.resources import DeviceProbe, Snapshot

log = logging.getLogger("anyad.scheduler")

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
MIB = 2 ** 20
# Poll interval while waiting for a device to report freed memory.
MEMORY_POLL_S = 0.1


class Loadable(Protocol):
    """What a local backend hands the scheduler for one model."""

    name: str

    @property
    def loaded(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def estimate(self, parallel: int) -> Estimate: ...

    async def load(self, placement: Placement, *, parallel: int, warm_up: bool) -> None:
        """Start the engine with this placement; raise ``LoadFailed`` when the engine refuses it."""

    async def unload(self) -> None:
        """Stop the engine and give its memory back to the OS."""


@dataclass(eq=False)
class ModelEntry:
    unit: Loadable
    policy: ModelPolicy
    slots: asyncio.Semaphore
    keep_alive: float  # the latest request's keep_alive, else the policy's
    waiting: int = 0
    active: int = 0
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    placement: Placement | None = None
    loaded_once: bool = False
    load_s: float | None = None
    last_used: float = 0.0
    expires_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    avg_hold_s: float = 5.0  # moving average of slot hold time, for Retry-After
    unload_after: str | None = None  # asked to unload while busy: why, until it is idle
    # No longer served: once it is idle and unloaded the entry is dropped and this awaited (its backend closed).
    retire: Callable[[], Awaitable[None]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0

    @property
    def usable(self) -> bool:
        return self.state == "loaded" and self.unit.loaded

    def retry_after(self) -> int:
        return max(1, math.ceil(self.avg_hold_s * (self.waiting + 1) / self.policy.parallel))


@dataclass(frozen=True, slots=True)
class Measured:
    """What a model's worker process holds, as the device reports it now (None: not told)."""

    rss_bytes: int | None
    vram_bytes: int | None


@dataclass(frozen=True, slots=True)
class ModelView:
    """One local model as the scheduler sees it at one moment: a copy, so reading it never
    races the scheduler, and the same for status, metrics, the doors and plugins."""

    name: str
    state: str  # unloaded | loading | loaded | unloading
    placement: Placement | None  # where it is loaded (GPU, layers, estimated memory); None when it is not
    n_layers: int  # layers the engine could offload to a GPU
    estimated_ram_bytes: int  # the placement's estimate, else what the CPU alone would take
    estimated_vram_bytes: int
    measured: Measured | None  # only from snapshot(measure=True), for a model with a worker process
    pid: int | None  # its worker process, while there is one
    keep_alive: float  # seconds it stays loaded after its last request (the latest request's, else configured)
    configured_keep_alive: float  # the model's own keep_alive setting
    expires_at: float | None  # when keep-alive unloads it (time.time()); None while busy, or for ever
    last_used: float  # when its last request let go of its slot (time.monotonic()); 0.0: never
    load_s: float | None  # how long its last load took
    active: int  # requests holding one of its slots
    waiting: int  # requests queued for one
    parallel: int  # its slots
    max_queue: int
    notes: tuple[str, ...]

    @property
    def loaded(self) -> bool:
        return self.state == "loaded"

    @property
    def device(self) -> str | None:
        """``gpu``, ``partial`` or ``cpu`` while placed, else None."""
        return None if self.placement is None else self.placement.kind

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0


class Scheduler:
    def __init__(self, settings: SchedulerSettings | None = None, probe: DeviceProbe | None = None) -> None:
        self.settings = settings or SchedulerSettings()
        self.probe = probe
        self.models: dict[str, ModelEntry] = {}
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()  # set whenever a model becomes idle
        self._tasks: set[asyncio.Task[None]] = set()
        # Called as listener(event, model, detail) on model.load, model.load_failed and
        # model.unload: the metrics and the audit log listen.
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []

    def register(self, unit: Loadable, policy: ModelPolicy, notes: list[str] | None = None) -> None:
        self.models[unit.name] = ModelEntry(unit, policy, asyncio.Semaphore(policy.parallel),
                                            keep_alive=policy.keep_alive, notes=list(notes or []))

    # -- requests ---------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, name: str, keep_alive: float | None = None, *, warm_up: bool = False) -> AsyncIterator[None]:
        """Hold one of the model's slots, with the model loaded, for the body of the block."""
        e = self.models[name]
        if e.slots.locked() and e.waiting >= e.policy.max_queue:
            raise QueueFull(f"model {name!r} is busy and its queue is full ({e.policy.max_queue} waiting); "
                            "retry later", retry_after=e.retry_after())
        e.waiting += 1
        self._cancel_timer(e)
        try:
            await self._acquire(e)
        finally:
            e.waiting -= 1
        e.active += 1
        started = time.monotonic()
        try:
            # As in Ollama: each request sets how long the model stays after it, its own
            # keep_alive or else the model's.
            e.keep_alive = e.policy.keep_alive if keep_alive is None else keep_alive
            if not e.usable:
                await self._ensure_loaded(e, warm_up)
            yield
        finally:
            e.active -= 1
            e.slots.release()
            e.last_used = time.monotonic()
            e.avg_hold_s = 0.8 * e.avg_hold_s + 0.2 * (e.last_used - started)
            self._released(e)

    async def _acquire(self, e: ModelEntry) -> None:
        wait = e.policy.queue_timeout_s
        try:
            if _timeout is not None:
                async with _timeout(wait):
                    await e.slots.acquire()
            else:  # pragma: no cover - Python 3.10
                await asyncio.wait_for(e.slots.acquire(), wait)
        except asyncio.TimeoutError:
            raise Unavailable(f"model {e.name!r} stayed busy for {wait:g} s while this request waited "
                              "(queue_timeout_s); retry later", retry_after=e.retry_after()) from None

    async def load(self, name: str, *, warm_up: bool = True) -> None:
        """Load a model now (preload, or an explicit request); its keep-alive clock starts after."""
        async with self.use(name, warm_up=warm_up):
            pass

    async def unload(self, name: str, why: str = "asked to", reason: str = "asked") -> bool:
        """Unload a model unless it is busy; True when it was unloaded."""
        e = self.models[name]
        async with self._lock:
            if e.busy or e.state != "loaded":
                return False
            await self._unload(e, why, reason)
            return True

    async def unload_when_idle(self, name: str, why: str = "asked to", *,
                               retire: Callable[[], Awaitable[None]] | None = None) -> tuple[str, int]:
        """Unload a model now, or as soon as the requests it is serving or queueing are done
        (it keeps serving them; the requests that arrive meanwhile too). Returns what
        happens: ("unloaded", 0), ("not_loaded", 0) or ("unloading", requests left).

        ``retire``: the model is no longer served; once it is unloaded (now, or when its
        last request is done) its entry is dropped and ``retire`` awaited (closing its
        backend). A model of the same name registered meanwhile is another entry, kept."""
        e = self.models[name]
        async with self._lock:
            if e.state not in ("loaded", "loading") and not e.busy:
                result = "not_loaded", 0
            elif not e.busy:
                await self._unload(e, why, "asked")
                result = "unloaded", 0
            else:
                e.unload_after = why
                e.retire = retire
                return "unloading", e.active + e.waiting
        if retire is not None:
            await self._retire(e, retire)
        return result

    async def _retire(self, e: ModelEntry, retire: Callable[[], Awaitable[None]]) -> None:
        if self.models.get(e.name) is e:
            del self.models[e.name]
        try:
            await retire()
        except Exception:
            log.exception("model %s: closing it after its unload failed", e.name)

    async def _asked(self, e: ModelEntry) -> None:
        """A model asked to unload while busy, idle now: unloaded, and retired if it is to be."""
        async with self._lock:
            if e.busy:
                return  # a request came meanwhile: its release comes back here
            retire, e.retire = e.retire, None
            if e.unload_after is not None and e.state == "loaded":
                await self._unload(e, e.unload_after, "asked")
            e.unload_after = None
        if retire is not None:
            await self._retire(e, retire)

    def ready(self, name: str) -> bool:
        """Preloaded models are ready once they have loaded; others as soon as they are registered."""
        e = self.models[name]
        return e.loaded_once or not e.policy.preload

    # -- keep-alive -------------------------------------------------------------------------

    def _cancel_timer(self, e: ModelEntry) -> None:
        if e.timer is not None:
            e.timer.cancel()
            e.timer = None
        e.expires_at = None

    def _released(self, e: ModelEntry) -> None:
        if e.busy:
            return
        asked = e.unload_after is not None or e.retire is not None
        if asked:  # (a model whose load failed meanwhile is retired all the same)
            self._spawn(self._asked(e))
        if e.state != "loaded":
            return
        self._idle.set()
        if asked:
            return
        if e.keep_alive == 0:
            self._spawn(self._expire(e, "keep_alive is 0"))
        elif math.isfinite(e.keep_alive):
            self._cancel_timer(e)
            e.expires_at = time.time() + e.keep_alive
            e.timer = asyncio.get_running_loop().call_later(
                e.keep_alive, lambda: self._spawn(self._expire(e, f"idle for {e.keep_alive:g} s (keep_alive)")))

    async def _expire(self, e: ModelEntry, why: str, reason: str = "idle") -> None:
        async with self._lock:
            if not e.busy and e.state == "loaded":
                await self._unload(e, why, reason)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- loading ----------------------------------------------------------------------------

    async def _ensure_loaded(self, e: ModelEntry, warm_up: bool) -> None:
        async with self._lock:
            if e.usable:
                return
            if e.state == "loaded":  # the worker died since: start over
                log.warning("model %s: its worker is gone; loading it again", e.name)
                e.state, e.placement = "unloaded", None
            e.state = "loading"
            try:
                await self._load(e, warm_up)
            except BaseException as exc:
                e.state, e.placement = "unloaded", None
                if isinstance(exc, AnyadError):
                    self._emit("model.load_failed", e.name, error=exc.message)
                raise
            e.state = "loaded"

    async def _snapshot(self, exclude: ModelEntry) -> Snapshot:
        if self.probe is None:
            self.probe = await asyncio.to_thread(DeviceProbe)
        snap = await asyncio.to_thread(self.probe.snapshot)
        # Memory-mapped weights count as "available" page cache, so RAM that loaded
        # models will touch is not subtracted by the OS: subtract their estimates too.
        committed = sum(m.placement.ram_bytes for m in self.models.values()
                        if m is not exclude and m.placement is not None)
        available = min(snap.ram_available_bytes, max(0, snap.ram_total_bytes - committed))
        if self.settings.max_ram_mib:
            available = min(available, max(0, self.settings.max_ram_mib * MIB - committed))
        return replace(snap, ram_available_bytes=available)

    def _victim(self, e: ModelEntry) -> ModelEntry | None:
        """The least recently used loaded model that is idle, other than ``e``."""
        idle = [m for m in self.models.values() if m is not e and m.state == "loaded" and not m.busy]
        return min(idle, key=lambda m: m.last_used, default=None)

    async def _plan(self, e: ModelEntry, est: Estimate) -> Placement:
        """Where ``e`` loads now, unloading idle models (least recently used first) to make room.

        When the room is held by busy models, waits for one to become idle, up to the
        model's ``queue_timeout_s``; then refuses with 503 saying what is missing.
        """
        s = self.settings
        limit = s.max_loaded_models
        pending: tuple[int, int] | None = None  # (GPU index, free bytes expected there) after an unload
        memory_deadline = 0.0
        give_up = time.monotonic() + e.policy.queue_timeout_s
        while True:
            others = [m for m in self.models.values() if m is not e and m.state != "unloaded"]
            if limit and len(others) >= limit:
                victim = self._victim(e)
                if victim is not None:
                    await self._unload(victim, f"to load {e.name} within max_loaded_models = {limit}", "evicted")
                elif not await self._wait_idle(give_up):
                    raise Unavailable(f"cannot load model {e.name!r}: {len(others)} models are loaded "
                                      f"(max_loaded_models = {limit}) and all of them stayed busy for "
                                      f"{e.policy.queue_timeout_s:g} s; retry later", retry_after=e.retry_after())
                continue
            snap = await self._snapshot(e)
            try:
                return plan(est, snap, e.policy.gpu, vram_reserve=s.gpu_reserve_mib * MIB,
                            ram_reserve=s.ram_reserve_mib * MIB)
            except InsufficientMemory as exc:
                if pending is not None and time.monotonic() < memory_deadline and not self._freed(snap, pending):
                    await asyncio.sleep(MEMORY_POLL_S)  # the device has not caught up with the unload yet
                    continue
                pending = None
                victim = self._victim(e)
                if victim is not None:
                    pending = self._expected_free(victim, snap)
                    await self._unload(victim, f"to free memory for {e.name} ({exc.message})", "evicted")
                    memory_deadline = time.monotonic() + s.memory_wait_s
                    continue
                busy = [m.name for m in self.models.values() if m is not e and m.state == "loaded"]
                if busy and await self._wait_idle(give_up):
                    continue
                if busy:
                    exc.message += f"; the loaded models ({', '.join(busy)}) stayed busy"
                    exc.retry_after = e.retry_after()
                raise

    async def _wait_idle(self, give_up: float) -> bool:
        """Wait until some model becomes idle; False once ``give_up`` (a monotonic time) has passed."""
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            return False
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    @staticmethod
    def _expected_free(victim: ModelEntry, snap: Snapshot) -> tuple[int, int] | None:
        p = victim.placement
        if p is None or p.gpu_index is None:
            return None  # RAM comes back when the process has exited, which unload waits for
        held = p.split[0][2] if p.split else p.vram_bytes  # what the main GPU gets back
        for g in snap.gpus:
            if g.index == p.gpu_index:
                return g.index, g.free_bytes + int(0.8 * held)
        return None

    @staticmethod
    def _freed(snap: Snapshot, pending: tuple[int, int]) -> bool:
        index, expected = pending
        return any(g.index == index and g.free_bytes >= expected for g in snap.gpus)

    async def _load(self, e: ModelEntry, warm_up: bool) -> None:
        est = e.unit.estimate(e.policy.parallel)
        first = await self._plan(e, est)
        for placement in self._fallbacks(e, est, first):
            t0 = time.monotonic()
            try:
                await e.unit.load(placement, parallel=e.policy.parallel, warm_up=warm_up)
            except LoadFailed as exc:
                if placement.gpu_layers == 0:
                    raise
                log.warning("model %s: loading with %d GPU layers failed (%s); trying again with fewer",
                            e.name, placement.gpu_layers, exc.message)
                continue
            e.placement, e.loaded_once, e.load_s = placement, True, time.monotonic() - t0
            log.info("model %s loaded in %.2f s: %s; estimated %.0f MiB RAM, %.0f MiB VRAM", e.name, e.load_s,
                     placement.reason, placement.ram_bytes / MIB, placement.vram_bytes / MIB)
            self._emit("model.load", e.name, seconds=e.load_s, placement=placement.kind,
                       gpu_layers=placement.gpu_layers)
            return

    def _fallbacks(self, e: ModelEntry, est: Estimate, first: Placement) -> list[Placement]:
        """The planned placement, then half its GPU layers, then the CPU (when RAM allows)."""
        out = [first]
        n = est.n_offload
        if first.gpu_layers > 1:
            k = first.gpu_layers // 2
            out.append(Placement(k, first.gpu_index, est.vram_bytes(k), est.ram_bytes(k),
                                 f"partial: {k} of {n} layers, after {first.gpu_layers} failed to load"))
        if first.gpu_layers > 0:
            out.append(Placement(0, None, 0, est.ram_bytes(0), "CPU, after loading on the GPU failed"))
        return out

    async def _unload(self, e: ModelEntry, why: str, reason: str) -> None:
        """Stop a model's engine; the caller holds the lock and has checked that it is idle.
        ``why`` is for people (the log), ``reason`` one word for the listeners (asked,
        idle, evicted)."""
        self._cancel_timer(e)
        e.unload_after = None
        e.state = "unloading"
        log.info("unloading model %s: %s", e.name, why)
        try:
            await e.unit.unload()
        finally:
            e.state, e.placement = "unloaded", None
            self._emit("model.unload", e.name, reason=reason, why=why)

    def _emit(self, event: str, model: str, **detail: Any) -> None:
        for listener in self.listeners:
            try:
                listener(event, model, detail)
            except Exception:  # metrics or the audit failing must never stop a load
                log.exception("a listener of %s failed", event)

    # -- visibility and shutdown -----------------------------------------------------------------

    def forget(self, name: str) -> None:
        """Drop an unloaded model that is no longer served (its backend was removed)."""
        self.models.pop(name, None)

    def view(self, name: str, *, measure: bool = False) -> ModelView | None:
        """The model ``name`` now (None: no such local model). ``measure``: ask the device
        what its worker holds (psutil, NVML: blocking, up to milliseconds)."""
        e = self.models.get(name)
        if e is None:
            return None
        p, pid = e.placement, e.unit.pid
        est = e.unit.estimate(e.policy.parallel)
        measured = None
        if measure and self.probe is not None and pid:
            m = self.probe.process_memory(pid)
            measured = Measured(m["rss_bytes"], m["vram_bytes"])
        return ModelView(
            name=name, state=e.state, placement=p, n_layers=est.n_offload,
            estimated_ram_bytes=p.ram_bytes if p else est.ram_bytes(0), estimated_vram_bytes=p.vram_bytes if p else 0,
            measured=measured, pid=pid, keep_alive=e.keep_alive, configured_keep_alive=e.policy.keep_alive,
            expires_at=e.expires_at, last_used=e.last_used, load_s=e.load_s, active=e.active, waiting=e.waiting,
            parallel=e.policy.parallel, max_queue=e.policy.max_queue, notes=tuple(e.notes))

    def snapshot(self, *, measure: bool = False) -> dict[str, ModelView]:
        """Every local model now, by name, in the order they were registered: what status,
        metrics, the doors and plugins read (a fresh dict of frozen views each call, safe to
        take from another thread). ``measure`` as in ``view``."""
        out: dict[str, ModelView] = {}
        for name in list(self.models):
            v = self.view(name, measure=measure)
            if v is not None:
                out[name] = v
        return out

    def status(self, name: str) -> dict[str, Any]:
        """One model's part of ``GET /api/status``."""
        v = self.view(name, measure=True)
        if v is None:
            raise KeyError(name)
        p, measured = v.placement, v.measured
        now = time.time()
        return {
            "state": v.state,
            "placement": None if p is None else {
                "kind": p.kind, "gpu_layers": p.gpu_layers, "n_layers": v.n_layers, "gpu": p.gpu_index,
                "reason": p.reason,
                **({"split": [{"gpu": g, "share": s, "estimated_vram_bytes": b} for g, s, b in p.split]}
                   if p.split else {})},
            "memory": {
                "estimated_ram_bytes": v.estimated_ram_bytes,
                "estimated_vram_bytes": v.estimated_vram_bytes,
                **({"rss_bytes": measured.rss_bytes, "vram_bytes": measured.vram_bytes} if measured else {}),
            },
            "keep_alive_s": v.keep_alive if math.isfinite(v.keep_alive) else None,
            "expires_in_s": None if v.expires_at is None else round(max(0.0, v.expires_at - now), 1),
            "load_s": None if v.load_s is None else round(v.load_s, 3),
            "queue": {"active": v.active, "waiting": v.waiting, "parallel": v.parallel, "max_queue": v.max_queue},
            "notes": list(v.notes),
        }

    async def close(self) -> None:
        for e in self.models.values():
            self._cancel_timer(e)
        for t in list(self._tasks):
            t.cancel()
        results = await asyncio.gather(*(e.unit.unload() for e in self.models.values()), return_exceptions=True)
        for e, r in zip(self.models.values(), results):
            e.state, e.placement = "unloaded", None
            if isinstance(r, AnyadError):
                log.warning("model %s: %s", e.name, r.message)
