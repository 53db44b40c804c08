"""The engine: conversations that come back, and streams decoded together. anyad vs
llama.cpp's own server (llama-server), side by side in one run.

Same GGUF (``half-b`` random weights from ``tests/ggufmaker.py``, about Qwen2-0.5B at
Q8_0), same threads, same context per slot, same sampling, everything on 127.0.0.1.

    B=$(PYTHON=$PWD/.venv/bin/python ../shared/bench/llama-server/build.sh | tail -1)
    .venv/bin/python bench/conversations.py --llama-server $B/bin/llama-server --json bench/results/conversations.json

Series:

- ``turns``: C conversations served round-robin, T turns each; each turn resends the
  whole conversation plus a new question, as every chat client does. Median time to
  first token per turn. Run as 4 × 4 on one slot and on four, and 8 conversations on two
  slots. Then each server is restarted and every conversation asked once more
  (``after restart``): llama-server loses its cache, anyad reads its disk tier.
- ``decode``: N streams sent at once (N = 1, 2, 4, 8, each server with N slots), 64
  tokens each: ``decode`` is the aggregate decode speed, the sum over the streams of each
  one's tokens after its first over its own first-to-last time (what decoding them
  together gives, whenever each joined); ``wall`` is all the tokens over the time from
  sending to the last token (prompt reads and arrival order included).
- ``rss``: the resident memory of the process holding the model (anyad's worker,
  llama-server) after the 4-slot series.

Every conversation's first message starts with a distinct tag, so nothing is shared
between conversations beyond the template's opening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from local_throughput import ROOT, HTTPContender, free_port

WORK = Path("/tmp/anyad-bench")
# About 300 tokens with the test tokenizer: a turn-1 read of a couple of seconds on two cores.
OPENING = ("Here are my notes from this week. The budget was approved after a long discussion about the "
           "cost of the new servers. The launch moved to May because the design review found problems "
           "with the onboarding flow. Two hires are planned for the support team. The office move is "
           "postponed until the lease ends. Please keep all of this in mind; I will ask you questions.")
QUESTIONS = ["What was approved?", "When is the launch now?", "Who are we hiring?", "Why did the move wait?",
             "Summarise it in one line.", "What should I tell my manager?"]
SAMPLING = {"temperature": 0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
REPLY_TOKENS = 24


class Server:
    """One contender, started (and restarted) on demand."""

    def __init__(self, name: str, cmd: list[str], port: int, model_id: str, ready: str) -> None:
        self.name, self.cmd, self.port, self.model_id, self.ready = name, cmd, port, model_id, ready
        self.http: HTTPContender | None = None

    async def start(self) -> None:
        self.http = HTTPContender(self.name, self.cmd, self.port, self.model_id)
        await self.http.wait_ready(self.ready, timeout=300)
        # A first request loads anyad's model (llama-server loads at start): not timed.
        await self.ask([{"role": "user", "content": "warm up"}], 1)

    async def stop(self) -> None:
        if self.http is not None:
            if self.http.session is not None:
                await self.http.session.close()
            self.http.close()
            self.http = None

    async def ask(self, msgs: list[dict], max_tokens: int = REPLY_TOKENS) -> tuple[float, str, float, int]:
        """(time to first token, reply text, time of the last token, completion tokens)."""
        assert self.http is not None and self.http.session is not None
        body = {"model": self.model_id, "messages": msgs, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **SAMPLING}
        t0 = time.perf_counter()
        first = last = None
        text: list[str] = []
        tokens = 0
        async with self.http.session.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    text.append(ev["choices"][0]["delta"]["content"])
        assert first is not None and last is not None
        return first - t0, "".join(text), last, tokens

    def model_rss(self) -> int:
        """Resident bytes of the process that holds the model."""
        assert self.http is not None
        proc = psutil.Process(self.http.proc.pid)
        workers = [p for p in proc.children(recursive=True) if "llama_cpp.worker" in " ".join(p.cmdline())]
        return (workers[0] if workers else proc).memory_info().rss


def anyad_server(model: Path, threads: int, n_ctx: int, parallel: int, data: Path) -> Server:
    port = free_port()
    cfg = WORK / f"conv-anyad-{parallel}.toml"
    cfg.write_text(f'data_dir = "{data}"\n[server]\nport = {port}\n[cache]\nenabled = false\n'
                   f'[history]\nenabled = false\n[models.m]\npath = "{model}"\nn_ctx = {n_ctx}\n'
                   f'n_threads = {threads}\nparallel = {parallel}\nkeep_alive = -1\n')
    return Server(f"anyad -np {parallel}", [sys.executable, "-m", "anyad", "serve", "--config", str(cfg)], port,
                  "m", "/ready")


def llama_server(binary: str, model: Path, threads: int, n_ctx: int, parallel: int, extra: list[str]) -> Server:
    port = free_port()
    # -c is the whole context: n_ctx per slot, as anyad's n_ctx.
    cmd = [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx * parallel),
           "-np", str(parallel), "--port", str(port), "--host", "127.0.0.1", *extra]
    return Server(f"llama-server -np {parallel}", cmd, port, "m", "/health")


async def turns(server: Server, n_conv: int, n_turns: int, tag: str) -> tuple[list[list[float]], list[list[dict]]]:
    """TTFT per turn per conversation, round-robin; the conversations as they end."""
    convs: list[list[dict]] = [[{"role": "user", "content": f"[{tag}-{c:02d}] {OPENING} {QUESTIONS[0]}"}]
                               for c in range(n_conv)]
    ttft: list[list[float]] = [[] for _ in range(n_turns)]
    for t in range(n_turns):
        for c in range(n_conv):
            if t:
                convs[c].append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            first, text, _, _ = await server.ask(convs[c])
            ttft[t].append(first)
            convs[c].append({"role": "assistant", "content": text})
    return ttft, convs


async def after_restart(server: Server, convs: list[list[dict]]) -> list[float]:
    await server.stop()
    await server.start()
    out = []
    for conv in convs:
        first, _, _, _ = await server.ask([*conv, {"role": "user", "content": "Anything else?"}])
        out.append(first)
    return out


async def decode(server: Server, n: int, tag: str) -> tuple[float, float]:
    """(aggregate decode tokens/s, wall tokens/s) of n streams sent at once."""
    msgs = [[{"role": "user", "content": f"[{tag}-{i}] Tell me a story."}] for i in range(n)]
    start = time.perf_counter()
    results = await asyncio.gather(*(server.ask(m, 64) for m in msgs))
    rates = [(r[3] - 1) / (r[2] - (start + r[0])) for r in results if r[3] > 1 and r[2] > start + r[0]]
    wall = sum(r[3] for r in results) / (max(r[2] for r in results) - start)
    return sum(rates), wall


def median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 1)


async def main() -> None:
    import ggufmaker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True, help="the llama-server binary (build.sh)")
    ap.add_argument("--model", type=Path, default=WORK / "half-b.gguf")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--server-args", default="", help="extra llama-server arguments, e.g. --no-repack")
    ap.add_argument("--skip", default="", help="comma-separated series to skip: turns,decode")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if not args.model.exists():
        print(f"writing {args.model} …", flush=True)
        ggufmaker.write_model(args.model, ggufmaker.HALF_B)
    threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    extra = args.server_args.split()
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                                       "logical": os.cpu_count()}, "turns": {}, "decode": {}, "rss": {}}

    if "turns" not in skip:
        for n_conv, n_turns, parallel in ((4, 4, 1), (4, 4, 4), (8, 3, 2)):
            key = f"{n_conv}x{n_turns} on {parallel}"
            out["turns"][key] = {}
            for make in ("anyad", "llama-server"):
                data = WORK / f"conv-data-{parallel}"
                shutil.rmtree(data, ignore_errors=True)
                server = anyad_server(args.model, threads, args.n_ctx, parallel, data) if make == "anyad" else \
                    llama_server(args.llama_server, args.model, threads, args.n_ctx, parallel, extra)
                await server.start()
                try:
                    ttft, convs = await turns(server, n_conv, n_turns, f"{make[:1]}{parallel}")
                    row = {f"turn {t + 1}": median_ms(x) for t, x in enumerate(ttft)}
                    if parallel == 4:
                        row["rss_mib"] = round(server.model_rss() / 2 ** 20)
                        out["rss"][server.name] = row["rss_mib"]
                    row["after restart"] = median_ms(await after_restart(server, convs))
                finally:
                    await server.stop()
                out["turns"][key][server.name] = row
                print(key, server.name, row, flush=True)

    if "decode" not in skip:
        for n in (1, 2, 4, 8):
            out["decode"][n] = {}
            for make in ("anyad", "llama-server"):
                data = WORK / "conv-data-decode"
                shutil.rmtree(data, ignore_errors=True)
                server = anyad_server(args.model, threads, 512, n, data) if make == "anyad" else \
                    llama_server(args.llama_server, args.model, threads, 512, n, extra)
                await server.start()
                try:
                    await decode(server, n, "w")  # the first batch of this size: graphs and pages
                    speeds = [await decode(server, n, f"d{r}") for r in range(3)]
                finally:
                    await server.stop()
                out["decode"][n][server.name.split(" -np")[0]] = {
                    "decode": round(statistics.median(s[0] for s in speeds), 1),
                    "wall": round(statistics.median(s[1] for s in speeds), 1)}
            print("decode", n, out["decode"][n], flush=True)

    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
