"""The scheduler's GPU decisions, on the GPU this machine lacks.

The stand-ins are for the hardware only: a recorded NVML whose used memory is what the
engines on it hold (and which, like a driver, reports a stopped engine's memory free only a
moment later), and an engine that allocates its placement's VRAM there and fails as CUDA
does when it does not fit. The scheduler, placement and estimate are the real ones; the
same paths run with real workers where a GPU exists (see bench/README.md).
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from anyad.config import ModelPolicy, SchedulerSettings
from anyad.errors import LoadFailed
from anyad.memory import estimate
from anyad.placement import InsufficientMemory, Placement
from anyad.resources import DeviceProbe
from anyad.scheduler import Scheduler
from fakes import RecordedNVML
from test_placement import SHAPE

GIB = 2 ** 30
ALL = SHAPE.n_layer + 1  # blocks and the output layer, as llama.cpp counts
FULL = estimate(SHAPE, 4096).vram_bytes(ALL)


class SimulatedGPU(RecordedNVML):
    def __init__(self, total: int, lag_s: float = 0.3) -> None:
        super().__init__([{"name": "Simulated GPU", "total": total, "free": total, "util": 0}])
        self.total, self.lag_s = total, lag_s
        self.held: dict[str, int] = {}
        self.releases: list[tuple[float, int]] = []  # (when the driver reports it free, bytes)

    def used(self) -> int:
        now = time.monotonic()
        return sum(self.held.values()) + sum(b for t, b in self.releases if now < t)

    def nvmlDeviceGetMemoryInfo(self, h):
        used = self.used()
        return SimpleNamespace(total=self.total, free=self.total - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []


class Engine:
    """A model's engine on the simulated GPU. ``actual`` scales what it really allocates
    against the estimate, to play an engine that needs more than was planned."""

    def __init__(self, name: str, gpu: SimulatedGPU, actual: float = 1.0) -> None:
        self.name, self.gpu, self.actual = name, gpu, actual
        self.loaded = False
        self.pid = None
        self.loads: list[tuple[float, Placement]] = []

    def estimate(self, parallel: int):
        return estimate(SHAPE, 4096, parallel=parallel)

    async def load(self, placement: Placement, *, parallel: int, warm_up: bool) -> None:
        await asyncio.sleep(0)
        need = int(placement.vram_bytes * self.actual)
        if need > self.gpu.total - self.gpu.used():
            raise LoadFailed(f"model {self.name!r} failed to load: CUDA error: out of memory")
        self.gpu.held[self.name] = need
        self.loads.append((time.monotonic(), placement))
        self.loaded = True

    async def unload(self) -> None:
        if self.loaded:
            self.gpu.releases.append((time.monotonic() + self.gpu.lag_s, self.gpu.held.pop(self.name)))
        self.loaded = False


def scheduler(device: SimulatedGPU, *names: str, actual: float = 1.0, **policy) -> tuple[Scheduler, dict[str, Engine]]:
    sched = Scheduler(SchedulerSettings(max_loaded_models=0, gpu_reserve_mib=0),
                      DeviceProbe(device, gpu_offload=True))
    engines = {n: Engine(n, device, actual) for n in names}
    for e in engines.values():
        sched.register(e, ModelPolicy(**policy))
    return sched, engines


async def test_vram_pressure_unloads_the_idle_model_and_waits_for_the_driver():
    gpu = SimulatedGPU(int(FULL * 1.5))
    sched, eng = scheduler(gpu, "a", "b", gpu="full")
    await sched.load("a")
    await sched.load("b")
    assert not eng["a"].loaded and eng["b"].loaded
    assert eng["b"].loads[0][1].gpu_layers == ALL
    # b was loaded only once the driver reported a's memory free again.
    (freed_at, _), = gpu.releases
    assert eng["b"].loads[0][0] >= freed_at


async def test_least_recently_used_goes_first():
    gpu = SimulatedGPU(int(FULL * 2.5), lag_s=0)
    sched, eng = scheduler(gpu, "a", "b", "c", gpu="full")
    for name in ("a", "b", "a", "c"):
        async with sched.use(name):
            pass
    assert {n: e.loaded for n, e in eng.items()} == {"a": True, "b": False, "c": True}


async def test_busy_models_keep_their_memory_and_the_refusal_says_why():
    gpu = SimulatedGPU(int(FULL * 1.5), lag_s=0)
    sched, eng = scheduler(gpu, "a", "b", gpu="full", queue_timeout_s=0.2)
    async with sched.use("a"):
        with pytest.raises(InsufficientMemory) as e:
            await sched.load("b")
        assert eng["a"].loaded
    msg = e.value.message
    assert "need" in msg and "VRAM" in msg and "free" in msg and "(a) stayed busy" in msg
    assert e.value.status == 503 and e.value.headers["Retry-After"]


async def test_an_engine_that_runs_out_of_gpu_memory_is_retried_with_fewer_layers():
    # The estimate fits exactly, but the engine needs 15 % more: CUDA refuses the full load.
    gpu = SimulatedGPU(FULL, lag_s=0)
    sched, eng = scheduler(gpu, "a", actual=1.15)
    await sched.load("a")
    (_, placement), = eng["a"].loads
    assert placement.gpu_layers == ALL // 2 and "after 25 failed" in placement.reason
    assert sched.status("a")["placement"]["kind"] == "partial"


async def test_auto_uses_part_of_a_gpu_before_unloading_anything():
    gpu = SimulatedGPU(int(FULL * 1.8), lag_s=0)
    sched, eng = scheduler(gpu, "a", "b")
    await sched.load("a")
    await sched.load("b")
    assert eng["a"].loaded and eng["b"].loaded
    assert 0 < eng["b"].loads[0][1].gpu_layers < ALL


class SimulatedGPUs(RecordedNVML):
    """Several GPUs; an engine's placement holds its share on each."""

    def __init__(self, *totals: int) -> None:
        super().__init__([{"name": f"Simulated GPU {i}", "total": t, "free": t, "util": 0, "i": i}
                          for i, t in enumerate(totals)])
        self.held: dict[tuple[str, int], int] = {}

    def nvmlDeviceGetMemoryInfo(self, h):
        used = sum(b for (_, i), b in self.held.items() if i == h["i"])
        return SimpleNamespace(total=h["total"], free=h["total"] - used, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return []


class SplitEngine(Engine):
    def __init__(self, name: str, gpus: SimulatedGPUs, est) -> None:
        self.name, self.gpus, self.est = name, gpus, est
        self.loaded, self.pid, self.loads = False, None, []

    def estimate(self, parallel: int):
        return self.est

    async def load(self, placement: Placement, *, parallel: int, warm_up: bool) -> None:
        for gpu, _, vram in placement.split or ((placement.gpu_index, 1.0, placement.vram_bytes),):
            self.gpus.held[(self.name, gpu)] = vram
        self.loads.append((time.monotonic(), placement))
        self.loaded = True

    async def unload(self) -> None:
        for key in [k for k in self.gpus.held if k[0] == self.name]:
            del self.gpus.held[key]
        self.loaded = False


async def test_a_model_too_big_for_any_one_gpu_is_split_and_status_shows_how():
    from anyad.resources import worker_env
    from test_placement import BIG

    need = BIG.vram_bytes(BIG.n_offload)
    gpus = SimulatedGPUs(int(0.5 * need), int(0.8 * need))
    sched = Scheduler(SchedulerSettings(max_loaded_models=0, gpu_reserve_mib=0), DeviceProbe(gpus, gpu_offload=True))
    engine = SplitEngine("big", gpus, BIG)
    sched.register(engine, ModelPolicy())
    await sched.load("big")
    (_, placement), = engine.loads
    # The roomier GPU (1) is the main one and takes the larger share; every layer is on a GPU.
    assert placement.kind == "split" and placement.gpus == (1, 0) and placement.gpu_layers == BIG.n_offload
    assert worker_env(placement.gpus)["CUDA_VISIBLE_DEVICES"] == "1,0"
    status = sched.status("big")["placement"]
    assert status["kind"] == "split" and [s["gpu"] for s in status["split"]] == [1, 0]
    assert status["split"][0]["share"] > status["split"][1]["share"]
    # What each GPU was asked for fits in it.
    assert all(gpus.held[("big", s["gpu"])] <= g["total"] for s in status["split"]
               for g in gpus.gpus if g["i"] == s["gpu"])
