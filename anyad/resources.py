"""What the machine has right now: GPUs through NVML, RAM and CPUs through psutil.

The probe never raises: no NVIDIA driver, no GPU, no ``pynvml``, or a
llama-cpp-python built without GPU support all give a CPU-only snapshot, with
the reason said once in the log at start. The NVML module is a parameter so
tests can hand in a recorded one; nothing else in anyad touches NVML.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger("anyad.resources")


@dataclass(frozen=True, slots=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_pct: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    gpus: tuple[GPU, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_logical: int
    cpu_physical: int
    load_1m: float
    # GPUs exist but models cannot use them (e.g. llama-cpp-python built for the CPU only).
    gpu_offload: bool = True
    notes: tuple[str, ...] = field(default=())

    @property
    def usable_gpus(self) -> tuple[GPU, ...]:
        return self.gpus if self.gpu_offload else ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["notes"] = list(self.notes)
        return d


_OFFLOAD_CHECK = "import llama_cpp; print(int(llama_cpp.llama_supports_gpu_offload()))"


def engine_gpu_offload() -> bool:
    """Can this llama-cpp-python build put layers on a GPU?

    Asked in a short-lived child process: importing a GPU build loads the CUDA
    runtime, which would otherwise sit in the daemon (a few hundred MiB) for the
    sake of one question.
    """
    try:
        p = subprocess.run([sys.executable, "-c", _OFFLOAD_CHECK], capture_output=True, text=True, timeout=120)
        return p.returncode == 0 and p.stdout.strip().endswith("1")
    except (OSError, subprocess.SubprocessError):  # an engine that cannot even say so cannot offload
        return False


@functools.cache
def cpu_repacks_weights() -> bool:
    """Does llama.cpp keep a repacked copy of quantized weights on this CPU (AMX, Linux)?"""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_int8" in line.split()
    except OSError:
        pass
    return False


def visible_gpus() -> set[int] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` allows (by NVML index), or None when it is not set."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return {int(x) for x in value.split(",") if x.strip()}
    except ValueError:  # UUIDs or MIG names: not mapped here, so all GPUs stay usable
        return None


def worker_env(gpus: Sequence[int]) -> dict[str, str]:
    """Environment for a model's worker: only the GPUs it was placed on (in its
    tensor_split's order: CUDA numbers them as listed), or none at all.

    Without this, llama.cpp spreads layers over every visible GPU, and a model placed on
    the CPU would still put buffers on a GPU. PCI bus order makes CUDA's numbering agree
    with NVML's.
    """
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}


class DeviceProbe:
    def __init__(self, nvml: Any = None, gpu_offload: bool | None = None) -> None:
        self._nvml = nvml
        self._nvml_ok = False
        self._reason: str | None = None
        if self._nvml is None:
            try:
                import pynvml

                self._nvml = pynvml
            except ImportError:
                self._reason = "nvidia-ml-py is not installed"
        if self._nvml is not None:
            try:
                self._nvml.nvmlInit()
                self._nvml_ok = True
            except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, …
                self._reason = f"no NVIDIA driver ({type(exc).__name__}: {exc})"
        self._gpu_offload = gpu_offload
        self._allowed = visible_gpus() if nvml is None else None

    @property
    def gpu_offload(self) -> bool:
        # Asked once, and only when there is a GPU to offload to.
        if self._gpu_offload is None:
            self._gpu_offload = engine_gpu_offload() if self._gpus()[0] else False
        return self._gpu_offload

    def _gpus(self) -> tuple[list[GPU], list[str]]:
        if not self._nvml_ok:
            return [], [self._reason] if self._reason else []
        nv = self._nvml
        gpus, notes = [], []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:
                    util = None
                if self._allowed is not None and i not in self._allowed:
                    continue  # hidden by CUDA_VISIBLE_DEVICES
                gpus.append(GPU(i, name, int(mem.total), int(mem.free), int(mem.used), util))
        except Exception as exc:
            notes.append(f"NVML query failed ({type(exc).__name__}: {exc}); treating the machine as CPU-only")
            return [], notes
        if not gpus:
            notes.append("NVML sees no GPU")
        return gpus, notes

    def snapshot(self) -> Snapshot:
        gpus, notes = self._gpus()
        if gpus and not self.gpu_offload:
            notes.append("llama-cpp-python was built without GPU support: models run on the CPU "
                         "(see the README for a CUDA build)")
        vm = psutil.virtual_memory()
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        logical = psutil.cpu_count() or 1
        return Snapshot(gpus=tuple(gpus), ram_total_bytes=int(vm.total), ram_available_bytes=int(vm.available),
                        cpu_logical=logical, cpu_physical=psutil.cpu_count(logical=False) or logical,
                        load_1m=load, gpu_offload=self.gpu_offload, notes=tuple(notes))

    def process_memory(self, pid: int) -> dict[str, int | None]:
        """What one process (a model's worker) holds now: resident RAM, and VRAM where NVML tells."""
        try:
            rss: int | None = psutil.Process(pid).memory_info().rss
        except (psutil.Error, OSError):
            rss = None
        vram: int | None = None
        if self._nvml_ok:
            nv = self._nvml
            try:
                for i in range(nv.nvmlDeviceGetCount()):
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(i)):
                        if p.pid == pid and p.usedGpuMemory is not None:
                            vram = (vram or 0) + int(p.usedGpuMemory)
            except Exception:  # not every driver reports per-process memory (e.g. inside some containers)
                pass
        return {"rss_bytes": rss, "vram_bytes": vram}

    def log_once(self) -> Snapshot:
        snap = self.snapshot()
        gib = 2 ** 30
        if snap.usable_gpus:
            for g in snap.usable_gpus:
                log.info("GPU %d: %s, %.1f of %.1f GiB free", g.index, g.name, g.free_bytes / gib,
                         g.total_bytes / gib)
        else:
            log.info("CPU only (%s); %d cores, %.1f of %.1f GiB RAM available", "; ".join(snap.notes) or "no GPU",
                     snap.cpu_physical, snap.ram_available_bytes / gib, snap.ram_total_bytes / gib)
        return snap

    def close(self) -> None:
        if self._nvml_ok:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml_ok = False
