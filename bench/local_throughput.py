"""Decode speed and time to first token: anyad vs raw llama-cpp-python vs llama_cpp.server.

One run, same GGUF, same prompts, same thread count, interleaved repetitions, medians.
The model is a random-weight GGUF of realistic shape (about Qwen2-0.5B, Q8_0), written
by ``tests/ggufmaker.py`` on first use; nothing is downloaded.

    .venv/bin/pip install 'llama-cpp-python[server]'      # for the llama_cpp.server contender only
    .venv/bin/python bench/local_throughput.py --reps 5 --max-tokens 128

Every prompt starts with a unique tag of the same length, so no contender gets a
KV-cache prefix hit and all read the same number of tokens.
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

# About 200 tokens with the test tokenizer (byte-level, few merges: ~1 token per character).
PROMPT = ("Summarise these notes for a colleague who missed the meeting: budget approved, "
          "launch moved to May, two hires planned, office move postponed until the lease ends.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHORT_PROMPT = "Hi, who are you?"
# The same sampling for every contender, spelled out: the engines' defaults differ
# (llama-cpp-python's chat handler defaults to repeat_penalty 1.1, which costs time per token).
SAMPLING = {"temperature": 0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


def messages(tag: str, prompt: str) -> list[dict]:
    return [{"role": "system", "content": f"[{tag}] You are a helpful assistant."},
            {"role": "user", "content": prompt}]


def raw_child(model: str, n_threads: int, n_ctx: int) -> None:
    """The raw contender's own process: llama-cpp-python in-process, timing itself.

    It runs apart from this script so that every contender is one process with its own
    thread pool and nothing else in it; requests and results are JSON lines on stdin/stdout.
    """
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for chunk in llm.create_chat_completion(messages(req["tag"], req["prompt"]), max_tokens=req["max_tokens"],
                                                stream=True, **SAMPLING):
            if chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
        print(json.dumps([first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n]), flush=True)


class Raw:
    name = "raw llama-cpp-python"

    def __init__(self, model: Path, n_threads: int, n_ctx: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--raw-child", str(model), str(n_threads), str(n_ctx)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def run(self, tag: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        self.proc.stdin.write(json.dumps({"tag": tag, "prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return tuple(json.loads(await asyncio.to_thread(self.proc.stdout.readline)))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(20)


class HTTPContender:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str) -> None:
        self.name = name
        self.port = port
        self.model_id = model_id
        # Logs go to a file: a chatty server (llama_cpp.server is verbose by default) would
        # block on a full pipe.
        self.log = Path(f"/tmp/anyad-bench/{name.replace(' ', '_')}.log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self.session: aiohttp.ClientSession | None = None

    async def wait_ready(self, path: str, timeout: float = 120) -> None:
        # A new connection per request for every contender: uvicorn drops idle keep-alive
        # connections after 5 s, less than the time the other contenders take.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                async with self.session.get(f"http://127.0.0.1:{self.port}{path}") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    async def run(self, tag: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
        body = {"model": self.model_id, "messages": messages(tag, prompt), "max_tokens": max_tokens, "stream": True,
                **SAMPLING}
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
        return first - t0, (n - 1) / (last - first) if n > 1 else 0.0, n

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
    ap.add_argument("--shape", choices=["half-b", "tiny"], default="half-b",
                    help="half-b: realistic speed; tiny: engine time near zero, so what remains is "
                         "each server's own per-request and per-token cost")
    ap.add_argument("--model", type=Path, help="GGUF to use (default: generated for --shape)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--no-server", action="store_true", help="skip llama_cpp.server")
    ap.add_argument("--json", type=Path, help="write raw samples here")
    args = ap.parse_args()

    shape = ggufmaker.HALF_B if args.shape == "half-b" else ggufmaker.TINY
    if args.model is None:
        args.model = Path(f"/tmp/anyad-bench/{args.shape}.gguf")
    if not args.model.exists():
        args.model.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {args.model} (random weights, {shape}) …", flush=True)
        ggufmaker.write_model(args.model, shape)
    threads = psutil.cpu_count(logical=False) or os.cpu_count()
    model_id = args.model.stem

    contenders: list = [Raw(args.model, threads, args.n_ctx)]
    port = free_port()
    cfg = Path("/tmp/anyad-bench/anyad.toml")
    cfg.write_text(f'[server]\nport = {port}\n[models."{model_id}"]\npath = "{args.model}"\nn_ctx = {args.n_ctx}\n')
    anyad = HTTPContender("anyad", [sys.executable, "-m", "anyad", "serve", "--config", str(cfg)], port, model_id)
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

    async with anyad.session.post(f"http://127.0.0.1:{anyad.port}/v1/chat/completions",
                                  json={"model": model_id, "messages": messages("c-9-0000", PROMPT), "max_tokens": 1}) as r:
        prompt_tokens = (await r.json())["usage"]["prompt_tokens"]
    async with anyad.session.post(f"http://127.0.0.1:{anyad.port}/v1/chat/completions",
                                  json={"model": model_id, "messages": messages("c-9-0000", SHORT_PROMPT),
                                        "max_tokens": 1}) as r:
        short_tokens = (await r.json())["usage"]["prompt_tokens"]

    # Two interleaved series: "ttft" (short prompt, 2 tokens: the fixed cost of a request)
    # and "decode" (long prompt, max_tokens tokens: prompt reading and steady decoding).
    series = {"ttft": (SHORT_PROMPT, 2, args.reps * 3), "decode": (PROMPT, args.max_tokens, args.reps)}
    samples: dict[str, dict[str, list[tuple[float, float, int]]]] = {
        k: {c.name: [] for c in contenders} for k in series}
    try:
        for c in contenders:  # warm-up: page the weights in, build graphs
            await c.run(f"w-{contenders.index(c)}-0000", PROMPT, 8)
        for kind, (prompt, max_tokens, reps) in series.items():
            for rep in range(reps):
                order = contenders[:]
                random.Random(rep).shuffle(order)
                for c in order:
                    # Same-length tags for all: with a byte-level tokenizer every character is a token.
                    s = await c.run(f"{kind[0]}-{contenders.index(c)}-{rep:04d}", prompt, max_tokens)
                    samples[kind][c.name].append(s)
                    print(f"{kind} {rep} {c.name:22s} ttft {s[0]*1000:7.1f} ms  decode {s[1]:6.2f} tok/s "
                          f"({s[2]} tokens)", flush=True)
    finally:
        for c in contenders:
            if isinstance(c, HTTPContender):
                if c.session:
                    await c.session.close()
            c.close()

    def med(kind: str, name: str, i: int) -> float:
        return statistics.median(x[i] for x in samples[kind][name])

    raw = contenders[0].name
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, {threads} threads, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}")
    print(f"model: {args.model.name} ({args.model.stat().st_size / 2**20:.0f} MiB); medians of interleaved runs; "
          f"short prompt {short_tokens} tokens x{args.reps * 3}, long prompt {prompt_tokens} tokens + "
          f"{args.max_tokens} new x{args.reps}")
    print()
    print("| contender | TTFT short prompt ms | vs raw | TTFT long prompt ms | vs raw | decode tok/s | vs raw |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in contenders:
        t_s, t_l, tps = med("ttft", c.name, 0), med("decode", c.name, 0), med("decode", c.name, 1)
        print(f"| {c.name} | {t_s*1000:.1f} | {(t_s - med('ttft', raw, 0))*1000:+.1f} ms | {t_l*1000:.1f} | "
              f"{(t_l - med('decode', raw, 0))*1000:+.1f} ms | {tps:.2f} | {tps / med('decode', raw, 1)*100:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--raw-child":
        raw_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        asyncio.run(main())
