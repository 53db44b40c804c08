"""Decode speed and time to first token: anyad vs raw llama-cpp-python vs llama_cpp.server.

One run, same GGUF, same prompts, same thread count, interleaved repetitions, medians.
The model is a random-weight GGUF of realistic shape (about Qwen2-0.5B, Q8_0), written
by ``tests/ggufmaker.py`` on first use; nothing is downloaded.

    .venv/bin/pip install 'llama-cpp-python[server]'      # for the llama_cpp.server contender only
    .venv/bin/python bench/local_throughput.py --reps 5 --max-tokens 128

Every prompt starts with a unique tag, so no contender gets a KV-cache prefix hit.
TTFT is request sent → first content byte; decode tok/s counts content chunks (one
per token with this model) after the first, over the time after the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = ("Summarise the following notes for a colleague who missed the meeting. " * 12).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(tag: str) -> list[dict]:
    return [{"role": "system", "content": f"[{tag}] You are a helpful assistant."},
            {"role": "user", "content": PROMPT}]


class Raw:
    name = "raw llama-cpp-python"

    def __init__(self, model: Path, n_threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                                   verbose=False)

    async def run(self, tag: str, max_tokens: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for chunk in self.llm.create_chat_completion(messages(tag), max_tokens=max_tokens, temperature=0,
                                                     stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
        return first - t0, (n - 1) / (last - first), n

    def close(self) -> None:
        self.llm.close()


class HTTPContender:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str) -> None:
        self.name = name
        self.port = port
        self.model_id = model_id
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.session: aiohttp.ClientSession | None = None

    async def wait_ready(self, path: str, timeout: float = 120) -> None:
        self.session = aiohttp.ClientSession()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}{path}") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    async def run(self, tag: str, max_tokens: int) -> tuple[float, float, int]:
        body = {"model": self.model_id, "messages": messages(tag), "max_tokens": max_tokens, "temperature": 0,
                "stream": True}
        t0 = time.perf_counter()
        first = last = None
        n = 0
        async with self.session.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    n += 1
        return first - t0, (n - 1) / (last - first), n

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def main() -> None:
    import ggufmaker
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("/tmp/anyad-bench/half-b-q8_0.gguf"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    ap.add_argument("--json", type=Path, help="write raw samples here")
    args = ap.parse_args()

    if not args.model.exists():
        args.model.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {args.model} (random weights, ~0.5B params, Q8_0) …", flush=True)
        ggufmaker.write_model(args.model, ggufmaker.HALF_B)
    threads = psutil.cpu_count(logical=False) or os.cpu_count()
    model_id = args.model.stem

    contenders: list = [Raw(args.model, threads, args.n_ctx)]
    port = free_port()
    anyad = HTTPContender("anyad", [sys.executable, "-m", "anyad", "serve", "--model", str(args.model),
                                    "--port", str(port)], port, model_id)
    await anyad.wait_ready("/ready")
    contenders.append(anyad)
    if not args.no_server:
        port = free_port()
        # llama_cpp.server with its defaults, except the thread count (equal footing) and the context.
        srv = HTTPContender("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model",
                                                 str(args.model), "--port", str(port), "--n_threads", str(threads),
                                                 "--n_ctx", str(args.n_ctx)], port, model_id)
        await srv.wait_ready("/v1/models")
        contenders.append(srv)

    samples: dict[str, list[tuple[float, float, int]]] = {c.name: [] for c in contenders}
    try:
        for c in contenders:  # warm-up: page the weights in, build graphs
            await c.run(f"warm-{c.name}", 8)
        for rep in range(args.reps):
            order = contenders[:]
            random.Random(rep).shuffle(order)
            for c in order:
                s = await c.run(f"rep{rep}-{c.name}", args.max_tokens)
                samples[c.name].append(s)
                print(f"rep {rep} {c.name:22s} ttft {s[0]*1000:7.1f} ms  decode {s[1]:6.2f} tok/s  ({s[2]} tokens)",
                      flush=True)
    finally:
        for c in contenders:
            if isinstance(c, HTTPContender):
                if c.session:
                    await c.session.close()
            c.close()

    raw = samples[contenders[0].name]
    raw_ttft = statistics.median(s[0] for s in raw)
    raw_tps = statistics.median(s[1] for s in raw)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, {threads} threads, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}")
    print(f"model: {args.model.name} ({args.model.stat().st_size / 2**20:.0f} MiB); prompt + template "
          f"~{len(PROMPT.split()) * 1.3:.0f} tokens; {args.max_tokens} new tokens; {args.reps} reps, medians")
    print()
    print("| contender | TTFT ms | vs raw | decode tok/s | vs raw |")
    print("|---|---:|---:|---:|---:|")
    for c in contenders:
        ttft = statistics.median(s[0] for s in samples[c.name])
        tps = statistics.median(s[1] for s in samples[c.name])
        print(f"| {c.name} | {ttft*1000:.1f} | {(ttft-raw_ttft)*1000:+.1f} ms | {tps:.2f} | {tps/raw_tps*100:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
