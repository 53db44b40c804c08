"""``Scheduler.snapshot()``: the frozen views status, metrics, the doors and plugins read
instead of the scheduler's own entries (the real scheduler, on the simulated GPU of
``test_scheduler_gpu``)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from test_scheduler_gpu import ALL, FULL, SimulatedGPU, scheduler


async def test_the_snapshot_is_a_frozen_copy_of_each_model():
    gpu = SimulatedGPU(int(FULL * 3), lag_s=0)
    sched, eng = scheduler(gpu, "a", "b", gpu="full", keep_alive=30, parallel=2, max_queue=3)
    before = sched.snapshot()
    assert list(before) == ["a", "b"]
    a = before["a"]
    assert (a.name, a.state, a.loaded, a.placement, a.device, a.busy) == ("a", "unloaded", False, None, None, False)
    assert (a.active, a.waiting, a.parallel, a.max_queue, a.keep_alive, a.configured_keep_alive) == (0, 0, 2, 3, 30, 30)
    assert a.estimated_ram_bytes == eng["a"].estimate(2).ram_bytes(0) and a.estimated_vram_bytes == 0
    assert (a.last_used, a.expires_at, a.load_s, a.measured, a.pid) == (0.0, None, None, None, None)

    async with sched.use("a", keep_alive=10):
        during = sched.view("a")
        assert during.loaded and during.busy and during.active == 1 and during.keep_alive == 10
        assert during.device == "gpu" and during.placement.gpu_layers == ALL and during.n_layers == ALL
        assert during.estimated_vram_bytes == during.placement.vram_bytes
        assert during.expires_at is None  # busy: no keep-alive clock
    after = sched.snapshot()["a"]
    assert not after.busy and after.last_used > 0 and after.load_s is not None and after.expires_at is not None
    assert (after.keep_alive, after.configured_keep_alive) == (10, 30)
    assert before["a"].state == "unloaded" and during.active == 1  # copies: what was taken stays as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.state = "unloaded"  # type: ignore[misc]
    assert sched.view("nope") is None


async def test_measured_memory_only_when_asked():
    gpu = SimulatedGPU(int(FULL * 1.5), lag_s=0)
    sched, eng = scheduler(gpu, "a", gpu="full")
    await sched.load("a")
    eng["a"].pid = os.getpid()  # a process that exists, for psutil
    assert sched.view("a").measured is None
    measured = sched.view("a", measure=True).measured
    assert measured.rss_bytes > 0 and measured.vram_bytes is None  # this GPU reports no process of its own
    assert sched.snapshot(measure=True)["a"].measured.rss_bytes > 0
    status = sched.status("a")
    assert status["memory"]["vram_bytes"] is None and status["memory"]["rss_bytes"] > 0
    assert status["queue"] == {"active": 0, "waiting": 0, "parallel": 1, "max_queue": 16}
