"""Where a model goes: all on one GPU, split over several, partly offloaded, or on the CPU.

A pure function of the model's memory estimate, a device snapshot and the
model's ``gpu`` setting, so every decision can be tested against recorded
machines. Eviction and waiting for memory to come back are the scheduler's;
this module only says what fits now, or why nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from anyad.config import GpuSetting
from anyad.errors import Unavailable
from anyad.memory import Estimate
from anyad.resources import Snapshot

GIB = 2 ** 30


@dataclass(frozen=True, slots=True)
class Placement:
    gpu_layers: int  # 0: CPU only
    gpu_index: int | None
    vram_bytes: int
    ram_bytes: int
    reason: str
    # Split over several GPUs by layers (llama.cpp's tensor_split): (GPU index, share of the
    # layers, VRAM it takes), the main GPU (``gpu_index``) first; empty: one GPU or none.
    split: tuple[tuple[int, float, int], ...] = field(default=())

    @property
    def kind(self) -> str:
        if self.gpu_layers == 0:
            return "cpu"
        if self.split:
            return "split"
        return "partial" if self.reason.startswith("partial") else "gpu"

    @property
    def gpus(self) -> tuple[int, ...]:
        """The GPUs the worker sees, in the order its tensor_split names them."""
        if self.split:
            return tuple(g for g, _, _ in self.split)
        return () if self.gpu_layers == 0 or self.gpu_index is None else (self.gpu_index,)


class InsufficientMemory(Unavailable):
    code = "insufficient_memory"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def plan(est: Estimate, snap: Snapshot, gpu: GpuSetting = "auto", *, vram_reserve: int = 512 * 2 ** 20,
         ram_reserve: int = 512 * 2 ** 20) -> Placement:
    """The placement for this model on this machine now; raises InsufficientMemory saying
    how much was needed and how much was there."""
    n_layer = est.n_offload  # blocks + the output layer, as llama.cpp counts n_gpu_layers
    ram_free = max(0, snap.ram_available_bytes - ram_reserve)
    gpus = sorted(snap.usable_gpus, key=lambda g: g.free_bytes, reverse=True)

    def on_cpu(why: str) -> Placement:
        need = est.ram_bytes(0)
        if need > ram_free:
            raise InsufficientMemory(f"not enough memory to load the model on the CPU: needs {_gib(need)}, "
                                     f"{_gib(ram_free)} of RAM available (after a {_gib(ram_reserve)} reserve)")
        return Placement(0, None, 0, need, why)

    if gpu == "cpu" or (gpu == "auto" and not gpus):
        return on_cpu("configured for the CPU" if gpu == "cpu" else "no usable GPU")
    if not gpus:
        raise InsufficientMemory(f"gpu = {gpu!r} asks for a GPU, but none is usable here")
    best = gpus[0]
    vram_free = max(0, best.free_bytes - vram_reserve)

    def fits(k: int) -> bool:
        return est.vram_bytes(k) <= vram_free and est.ram_bytes(k) <= ram_free

    def split() -> Placement | None:
        """All layers over the fewest GPUs that hold them, each a share by its free memory."""
        for n in range(2, len(gpus) + 1):
            chosen = gpus[:n]
            free = [max(0, g.free_bytes - vram_reserve) for g in chosen]
            # The layers fill what each GPU has left after its fixed costs, in proportion.
            room = [max(0, f - est.device_fixed_bytes) for f in free]
            if not all(room):
                return None
            shares = [r / sum(room) for r in room]
            need = est.vram_split(shares)
            if all(v <= f for v, f in zip(need, free)) and est.ram_bytes(n_layer) <= ram_free:
                parts = ", ".join(f"GPU {g.index} {round(100 * s)} %" for g, s in zip(chosen, shares))
                return Placement(n_layer, chosen[0].index, sum(need), est.ram_bytes(n_layer),
                                 f"split: all {n_layer} layers over {n} GPUs ({parts}); none holds them alone",
                                 split=tuple((g.index, round(s, 4), v) for g, s, v in zip(chosen, shares, need)))
        return None

    if gpu == "full" or isinstance(gpu, int) and not isinstance(gpu, bool):
        k = n_layer if gpu == "full" else max(0, min(int(gpu), n_layer))
        if k == 0:
            return on_cpu("gpu = 0 layers")
        if not fits(k) and k == n_layer and (over := split()) is not None:
            return over
        if not fits(k):
            raise InsufficientMemory(
                f"{k} layers on GPU {best.index} ({best.name}) need {_gib(est.vram_bytes(k))} of VRAM and "
                f"{_gib(est.ram_bytes(k))} of RAM; {_gib(vram_free)} VRAM and {_gib(ram_free)} RAM are free")
        return Placement(k, best.index, est.vram_bytes(k), est.ram_bytes(k),
                         "all layers on the GPU" if k == n_layer else f"partial: {k} of {n_layer} layers as set")
    # auto: everything on the GPU, else as many layers as fit, else the CPU.
    if fits(n_layer):
        return Placement(n_layer, best.index, est.vram_bytes(n_layer), est.ram_bytes(n_layer),
                         "all layers on the GPU")
    over = split()
    if over is not None:
        return over
    k = n_layer - 1
    while k > 0 and not fits(k):
        k -= 1
    if k > 0:
        return Placement(k, best.index, est.vram_bytes(k), est.ram_bytes(k),
                         f"partial: {k} of {n_layer} layers fit in {_gib(vram_free)} of free VRAM")
    return on_cpu(f"the GPU has {_gib(vram_free)} free, less than one layer needs")
