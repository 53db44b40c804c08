"""The memory estimate against measured memory, and cold start against a loaded model.

For each model shape (random weights, realistic sizes, written by ``tests/ggufmaker.py``;
nothing is downloaded):

memory
    The model is loaded through anyad's own scheduler and worker (with its warm-up), on
    the CPU and, where the machine has a usable GPU, fully on the GPU. Three measures:
    what llama.cpp itself says it allocated (its buffer-size log lines, from a separate
    verbose load with the same settings: the memory the model can come to use); the
    worker's RSS right after the load and after a 1500-token prompt (RSS counts only
    pages touched so far: weights are memory-mapped and buffers are filled lazily), minus
    the RSS of an idle process that has imported llama_cpp; and for VRAM what NVML reports
    for the worker process, or the drop in the GPU's free memory where the driver does not
    report per process (either includes the CUDA context).

cold start
    ``anyad serve`` with two entries for the same file: one with ``keep_alive = 0`` (every
    request finds it unloaded and pays for the load) and one kept loaded. Time to first
    token of each, median over the repetitions, beside the reference: a fresh Python
    process that imports llama_cpp, constructs ``Llama`` and streams the first token,
    which is what any server pays to start a model.

    .venv/bin/python bench/memory_cold_start.py --shapes half-b,1b --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MIB = 2 ** 20
PROMPT = [{"role": "user", "content": "Hi, who are you?"}]


def model_path(models_dir: Path, shape: str) -> Path:
    import ggufmaker

    path = models_dir / f"{shape}.gguf"
    if not path.exists():
        print(f"writing {path} …", file=sys.stderr, flush=True)
        ggufmaker.write_model(path, ggufmaker.SHAPES[shape])
    return path


def idle_engine_rss() -> int:
    """RSS of a process that has imported llama_cpp and initialised its backends, holding no model."""
    code = ("import sys, llama_cpp; llama_cpp.llama_backend_init(); print('ok', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=engine_env(0))
    try:
        assert p.stdout.readline().strip() == "ok"
        return psutil.Process(p.pid).memory_info().rss
    finally:
        p.kill()
        p.wait()


ALLOCATED = r"""
import re, sys, llama_cpp
llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_gpu_layers=int(sys.argv[3]), verbose=True)
"""


def llama_allocated(path: Path, n_ctx: int, gpu_layers: int) -> tuple[float, float]:
    """(host bytes, device bytes) that llama.cpp reports allocating for the model."""
    import re

    p = subprocess.run([sys.executable, "-c", ALLOCATED, str(path), str(n_ctx), str(gpu_layers)],
                       capture_output=True, text=True, timeout=600, env=engine_env(gpu_layers))
    if os.environ.get("ANYAD_BENCH_SHOW_BUFFERS"):
        print("\n".join(l for l in p.stderr.splitlines() if "buffer size" in l), file=sys.stderr)
    host = dev = 0.0
    for m in re.finditer(r"^\S+:\s+(\S+) (?:\S+ )?(?:model|KV|compute|output) buffer size =\s+([\d.]+) MiB",
                         p.stderr, re.M):
        where, mib = m.group(1), float(m.group(2))
        if where.startswith(("CUDA", "ROCm", "Vulkan", "Metal")) and "Host" not in where:
            dev += mib * MIB
        else:
            host += mib * MIB
    return host, dev


LONG_PROMPT = "".join(chr(33 + (i * 7919) % 94) for i in range(1500))


async def measure_memory(path: Path, n_ctx: int, gpu: str, probe, baseline: int) -> dict:
    from anyad.backends.llama_cpp.backend import LlamaCppBackend
    from anyad.config import parse_settings
    from anyad.scheduler import Scheduler

    s = parse_settings({"scheduler": {"max_loaded_models": 0},
                        "models": {"m": {"path": str(path), "n_ctx": n_ctx, "gpu": gpu, "keep_alive": -1}}})
    sched = Scheduler(s.scheduler, probe)
    backend = LlamaCppBackend.from_model("m", s.models["m"], s.defaults, sched)
    before = probe.snapshot()
    await sched.load("m", warm_up=True)
    await asyncio.sleep(0.5)  # let NVML catch up
    after = probe.snapshot()
    p = sched.models["m"].placement
    mem = probe.process_memory(backend.pid)
    vram = mem["vram_bytes"]
    how = "per process"
    if p.gpu_layers and not vram and before.gpus:
        g0 = {g.index: g.free_bytes for g in before.gpus}
        vram = max(g0[g.index] - g.free_bytes for g in after.gpus)
        how = "free-memory drop"
    from anyad.stream import ChatRequest, SamplingParams

    request = ChatRequest(model="m", messages=[{"role": "user", "content": LONG_PROMPT}],
                          params=SamplingParams(max_tokens=8, temperature=0))
    async for _ in backend.chat(request, "m"):
        pass
    rss_used = psutil.Process(backend.pid).memory_info().rss
    await sched.close()
    host, dev = await asyncio.to_thread(llama_allocated, path, n_ctx, p.gpu_layers)
    return {"gpu_layers": p.gpu_layers, "est_ram": p.ram_bytes, "alloc_ram": host,
            "rss": mem["rss_bytes"] - baseline, "rss_used": rss_used - baseline,
            "est_vram": p.vram_bytes, "alloc_vram": dev, "vram": vram if p.gpu_layers else 0, "vram_how": how}


RAW_COLD = r"""
import sys, time, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_gpu_layers=int(sys.argv[3]), n_threads=int(sys.argv[4]),
                      n_threads_batch=int(sys.argv[4]), verbose=False)
for ch in llm.create_chat_completion([{"role": "user", "content": "Hi, who are you?"}], max_tokens=4, stream=True,
                                     temperature=0):
    if ch["choices"][0]["delta"].get("content"):
        print("first", flush=True)
        break
"""


def engine_env(gpu_layers: int) -> dict[str, str]:
    """The same device visibility anyad gives its workers (none for the CPU, one GPU otherwise)."""
    from anyad.resources import worker_env

    return {**os.environ, **worker_env(0 if gpu_layers else None)}


def raw_cold(path: Path, n_ctx: int, gpu_layers: int, threads: int) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RAW_COLD, str(path), str(n_ctx), str(gpu_layers), str(threads)],
                         stdout=subprocess.PIPE, text=True, env=engine_env(gpu_layers))
    line = p.stdout.readline()
    dt = time.perf_counter() - t0
    p.wait()
    assert line.strip() == "first", "the raw contender produced no token"
    return dt


async def ttft(session: aiohttp.ClientSession, base: str, model: str) -> float:
    t0 = time.perf_counter()
    async with session.post(base + "/v1/chat/completions", json={
            "model": model, "messages": PROMPT, "max_tokens": 4, "stream": True, "temperature": 0}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                dt = time.perf_counter() - t0
                async for _ in r.content:
                    pass
                return dt
    raise AssertionError("no token")


async def cold_start(path: Path, n_ctx: int, gpu: str, gpu_layers: int, reps: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "anyad.toml"
        common = f'path = "{path}"\nn_ctx = {n_ctx}\ngpu = "{gpu}"\nn_threads = {threads}\n'
        cfg.write_text(f'data_dir = "{d}"\n[models.cold]\n{common}keep_alive = 0\n'
                       f'[models.warm]\n{common}keep_alive = -1\npreload = true\n')
        log = open(Path(d) / "log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "anyad", "serve", "--config", str(cfg), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(600):
                    try:
                        async with s.get(base + "/ready") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.2)
                cold, warm, raw = [], [], []
                for _ in range(reps):
                    cold.append(await ttft(s, base, "cold"))
                    for _ in range(300):  # keep_alive 0: unloaded right after the reply
                        async with s.get(base + "/api/status") as r:
                            if (await r.json())["models"]["cold"]["state"] == "unloaded":
                                break
                        await asyncio.sleep(0.05)
                    warm.append(await ttft(s, base, "warm"))
                    raw.append(await asyncio.to_thread(raw_cold, path, n_ctx, gpu_layers, threads))
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    med = statistics.median
    return {"cold": med(cold), "warm": med(warm), "raw_cold": med(raw), "reps": reps}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="half-b,1b")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models-dir", default="/tmp/anyad-bench")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()

    from anyad.backends.llama_cpp.backend import default_threads
    from anyad.resources import DeviceProbe

    models_dir = Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    probe = DeviceProbe()
    snap = probe.snapshot()
    gpus = ", ".join(f"{g.name} ({g.total_bytes / 2 ** 30:.0f} GiB)" for g in snap.gpus) or "none"
    print(f"machine: {platform.machine()}, {snap.cpu_physical} cores, {snap.ram_total_bytes / 2 ** 30:.1f} GiB RAM, "
          f"GPUs: {gpus}, GPU offload: {snap.usable_gpus != ()}; n_ctx {args.n_ctx}")
    baseline = idle_engine_rss()
    print(f"idle engine process RSS (subtracted): {baseline / MIB:.0f} MiB\n")
    placements = ["cpu"] + (["full"] if snap.usable_gpus else [])
    results: dict = {}
    print("| shape | placement | estimated RAM | llama.cpp allocated | error | RSS after load | RSS after a "
          "1500-token prompt | estimated VRAM | llama.cpp allocated | NVML measured | error vs NVML |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        path = model_path(models_dir, shape)
        for gpu in placements:
            m = await measure_memory(path, args.n_ctx, gpu, probe, baseline)
            results[f"{shape}/{gpu}/memory"] = m

            def err(est: int, got: int) -> str:
                return f"{(est - got) / got * 100:+.1f} %" if got else "-"

            vram = (f"{m['est_vram'] / MIB:.0f} MiB | {m['alloc_vram'] / MIB:.0f} MiB | {m['vram'] / MIB:.0f} MiB "
                    f"({m['vram_how']}) | {err(m['est_vram'], m['vram'])}") if m["gpu_layers"] else "- | - | - | -"
            print(f"| {shape} | {gpu} ({m['gpu_layers']} layers) | {m['est_ram'] / MIB:.0f} MiB | "
                  f"{m['alloc_ram'] / MIB:.0f} MiB | {err(m['est_ram'], int(m['alloc_ram']))} | "
                  f"{m['rss'] / MIB:.0f} MiB | {m['rss_used'] / MIB:.0f} MiB | {vram} |", flush=True)
    print("\n| shape | placement | anyad cold (load + first token) | raw llama-cpp-python cold | "
          "anyad loaded | reps |")
    print("|---|---|---|---|---|---|")
    threads = default_threads()
    for shape in args.shapes.split(","):
        path = model_path(models_dir, shape)
        for gpu in placements:
            layers = 0 if gpu == "cpu" else 999
            c = await cold_start(path, args.n_ctx, gpu, layers, args.reps, threads)
            results[f"{shape}/{gpu}/cold_start"] = c
            print(f"| {shape} | {gpu} | {c['cold'] * 1000:.0f} ms | {c['raw_cold'] * 1000:.0f} ms | "
                  f"{c['warm'] * 1000:.0f} ms | {c['reps']} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main())
