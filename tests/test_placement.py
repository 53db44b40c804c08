"""Placement and the device probe over recorded machines (the only place a stand-in is
used: this machine has no GPU, so NVML is fed recorded answers at the probe's boundary)."""

from __future__ import annotations

import pytest

from anyad.memory import GPU_DEVICE_OVERHEAD, GPU_HOST_OVERHEAD, ModelShape, estimate, read_shape
from anyad.placement import InsufficientMemory, plan
from anyad.resources import GPU, DeviceProbe, Snapshot
from fakes import RecordedNVML

GIB = 2 ** 30
MIB = 2 ** 20

# About Qwen2-0.5B at Q8_0: 24 blocks of ~15 MiB, a 138 MiB output layer.
SHAPE = ModelShape(n_layer=24, n_embd=896, n_ff=4864, n_head=14, n_head_kv=2, key_length=64, value_length=64,
                   n_vocab=151936, layer_bytes=(15 * MIB,) * 24, output_bytes=138 * MIB, input_bytes=138 * MIB,
                   trained_ctx=32768)
EST = estimate(SHAPE, 4096)


def machine(*gpus_free_total: tuple[float, float], ram_gib: float = 16, offload: bool = True) -> Snapshot:
    gpus = tuple(GPU(i, f"GPU{i}", int(t * GIB), int(f * GIB), int((t - f) * GIB), 0)
                 for i, (f, t) in enumerate(gpus_free_total))
    return Snapshot(gpus=gpus, ram_total_bytes=int(ram_gib * GIB), ram_available_bytes=int(ram_gib * GIB),
                    cpu_logical=8, cpu_physical=4, load_1m=0.1, gpu_offload=offload)


def test_no_gpu_goes_to_cpu():
    p = plan(EST, machine())
    assert (p.kind, p.gpu_layers, p.vram_bytes) == ("cpu", 0, 0)
    assert p.ram_bytes == EST.total_bytes


def test_large_gpu_takes_everything():
    p = plan(EST, machine((20, 24)))
    assert p.kind == "gpu" and p.gpu_layers == 25 and p.gpu_index == 0  # 24 blocks and the output layer
    # Only the input embeddings (138 MiB) and the GPU runtime's host side stay in RAM.
    assert p.vram_bytes == EST.vram_bytes(25) and p.ram_bytes < 200 * MIB + GPU_HOST_OVERHEAD


def test_small_gpu_gets_as_many_layers_as_fit():
    # reserve + the GPU runtime + the output layer + ~9 blocks
    free = 0.5 + (GPU_DEVICE_OVERHEAD + EST.compute_bytes + 138 * MIB + 9 * (15 * MIB + EST.kv_layer_bytes)) / GIB
    p = plan(EST, machine((free, 2)))
    assert p.kind == "partial" and 9 <= p.gpu_layers <= 10
    assert p.vram_bytes <= free * GIB - 512 * MIB
    assert plan(EST, machine((free, 2))).gpu_layers == p.gpu_layers  # deterministic


def test_two_gpus_picks_the_one_with_most_free_memory():
    p = plan(EST, machine((1, 8), (6, 8)))
    assert p.gpu_index == 1 and p.gpu_layers == 25


def test_nearly_full_gpu_falls_back_to_cpu():
    p = plan(EST, machine((0.55, 24)))
    assert p.kind == "cpu" and "less than one layer" in p.reason


def test_explicit_settings():
    assert plan(EST, machine((20, 24)), "cpu").kind == "cpu"
    assert plan(EST, machine((20, 24)), 5).gpu_layers == 5
    assert plan(EST, machine((20, 24)), 99).gpu_layers == 25
    with pytest.raises(InsufficientMemory, match="need .* of VRAM"):
        plan(EST, machine((0.7, 24)), "full")
    with pytest.raises(InsufficientMemory, match="none is usable"):
        plan(EST, machine(), "full")


def test_gpu_unusable_by_the_engine_means_cpu():
    assert plan(EST, machine((20, 24), offload=False)).kind == "cpu"


def test_refusal_says_needed_and_available():
    with pytest.raises(InsufficientMemory) as e:
        plan(EST, machine(ram_gib=0.6))
    assert e.value.status == 503
    assert "needs 0." in e.value.message and "available" in e.value.message


def test_layers_count_as_llama_cpp_counts_them():
    # n_gpu_layers = 1 is the output layer alone; each further one adds a block, from the last.
    assert EST.vram_bytes(1) == 138 * MIB + EST.compute_bytes + GPU_DEVICE_OVERHEAD
    assert EST.vram_bytes(2) - EST.vram_bytes(1) == 15 * MIB + EST.kv_layer_bytes
    assert EST.ram_bytes(1) == EST.ram_bytes(0) - 138 * MIB - EST.compute_bytes + 16 * MIB + GPU_HOST_OVERHEAD
    assert EST.vram_bytes(99) == EST.vram_bytes(25) and EST.ram_bytes(25) == 138 * MIB + 16 * MIB + GPU_HOST_OVERHEAD


def test_amx_repacking_counts_a_second_copy_of_quantized_weights():
    shape = ModelShape(**{**{f: getattr(SHAPE, f) for f in SHAPE.__slots__}, "repackable_bytes": 500 * MIB})
    plain, repacked = estimate(shape, 4096), estimate(shape, 4096, repack=True)
    assert repacked.ram_bytes(0) - plain.ram_bytes(0) == int(0.9 * 500 * MIB)
    assert repacked.ram_bytes(25) == plain.ram_bytes(25)  # nothing left on the CPU to repack


def test_one_shared_context_costs_one_copy_and_one_buffer_beside_the_kv_of_every_sequence():
    slots, shared = estimate(SHAPE, 4096, parallel=4), estimate(SHAPE, 4096, parallel=4, shared=True)
    one = estimate(SHAPE, 4096)
    kv_all = 24 * one.kv_layer_bytes
    # On the CPU: the KV of four sequences either way; one compute buffer instead of four,
    # a larger one (it attends over all 4 × 4096 cells).
    assert shared.ram_bytes(0) - one.ram_bytes(0) == 3 * kv_all + shared.compute_bytes - one.compute_bytes
    assert slots.ram_bytes(0) - one.ram_bytes(0) == 3 * (kv_all + one.compute_bytes)
    assert one.compute_bytes < shared.compute_bytes < 4 * one.compute_bytes
    # On a GPU: the layers once, not four times.
    weights = 24 * 15 * MIB + 138 * MIB
    assert shared.vram_bytes(25) == weights + 4 * kv_all + shared.compute_bytes + GPU_DEVICE_OVERHEAD
    assert slots.vram_bytes(25) - shared.vram_bytes(25) == 3 * weights + 4 * one.compute_bytes - \
        shared.compute_bytes
    # A quantized KV cache: q8_0 takes 34/32 bytes an element where f16 takes 2.
    q8 = estimate(SHAPE, 4096, cache_type="q8_0")
    assert q8.kv_layer_bytes == int(one.kv_layer_bytes * 17 / 32)


def test_estimate_of_a_real_file(tiny_model):
    shape = read_shape(tiny_model)
    assert (shape.n_layer, shape.n_embd, shape.n_head, shape.n_head_kv) == (2, 64, 4, 2)
    assert shape.n_vocab == 265 and shape.trained_ctx == 2048
    est = estimate(shape, 2048)
    assert est.kv_layer_bytes == 2048 * 2 * (16 + 16) * 2  # f16 K and V for 2 KV heads of 16
    assert est.total_bytes > sum(shape.layer_bytes) + shape.output_bytes


def test_probe_with_a_recorded_gpu():
    nv = RecordedNVML([{"name": "NVIDIA RTX 4090", "total": 24 * GIB, "free": 20 * GIB, "util": 7}])
    snap = DeviceProbe(nv, gpu_offload=True).snapshot()
    assert snap.gpus == (GPU(0, "NVIDIA RTX 4090", 24 * GIB, 20 * GIB, 4 * GIB, 7),)
    assert snap.ram_total_bytes > 0 and snap.cpu_logical >= 1


def test_probe_without_driver_or_engine_support_is_cpu_only(caplog):
    import logging

    caplog.set_level(logging.INFO)
    snap = DeviceProbe(RecordedNVML(fail_init=True), gpu_offload=True).log_once()
    assert snap.gpus == () and "no NVIDIA driver" in snap.notes[0]
    assert "CPU only" in caplog.text
    nv = RecordedNVML([{"name": "T4", "total": 16 * GIB, "free": 15 * GIB, "util": 0}])
    snap = DeviceProbe(nv, gpu_offload=False).snapshot()
    assert snap.gpus and not snap.usable_gpus and "without GPU support" in snap.notes[0]


def test_real_probe_on_this_machine_never_raises():
    snap = DeviceProbe().snapshot()  # the real pynvml and llama-cpp-python
    assert snap.ram_available_bytes > 0
    if not snap.gpus:
        assert snap.notes


# About an 8B model at Q4: 24 blocks of 180 MiB.
BIG = estimate(ModelShape(**{**{f: getattr(SHAPE, f) for f in SHAPE.__slots__}, "layer_bytes": (180 * MIB,) * 24}),
               4096)


def test_a_model_no_gpu_holds_alone_is_split_over_the_fewest_that_hold_it():
    need = BIG.vram_bytes(BIG.n_offload)
    # Two GPUs with 75 % and 60 % of what the whole model needs free, a third with 40 %.
    snap = machine((0.75 * need / GIB, 16), (0.6 * need / GIB, 16), (0.4 * need / GIB, 16))
    p = plan(BIG, snap, vram_reserve=0)
    assert p.kind == "split" and p.gpu_layers == BIG.n_offload and p.gpu_index == 0
    assert p.gpus == (0, 1)  # two are enough: the third is left alone
    (g0, s0, v0), (g1, s1, v1) = p.split
    assert s0 > s1 and abs(s0 + s1 - 1) < 1e-3  # shares by free memory, the roomier GPU first
    assert v0 <= 0.75 * need and v1 <= 0.6 * need and p.vram_bytes == v0 + v1
    assert "over 2 GPUs" in p.reason
    # Each GPU pays its own CUDA context and compute buffer: the split costs that much more.
    assert v0 + v1 == need + BIG.device_fixed_bytes


def test_a_model_that_fits_on_one_gpu_is_not_split_and_a_split_must_fit():
    need = BIG.vram_bytes(BIG.n_offload)
    assert plan(BIG, machine((1.1 * need / GIB, 16), (1.1 * need / GIB, 16)), vram_reserve=0).kind == "gpu"
    # Together too small for the whole model: part on one GPU, the rest on the CPU, as before.
    p = plan(BIG, machine((0.45 * need / GIB, 16), (0.45 * need / GIB, 16)), vram_reserve=0)
    assert p.kind == "partial" and not p.split
    # gpu = "full" takes a split where one GPU is not enough.
    assert plan(BIG, machine((0.7 * need / GIB, 16), (0.7 * need / GIB, 16)), "full", vram_reserve=0).kind == "split"
