"""Response-cache hits against misses, and what recording the history costs.

Both against real ``anyad serve`` processes on the tiny test model (whose engine time
is near zero, so anyad's own costs are what shows):

- cache: one deterministic request (temperature 0) answered from the cache again and
  again, against the same request with ``Cache-Control: no-cache`` (the model runs):
  sequential latency p50/p99, and requests per second with C concurrent clients;
- history: two daemons, history on and off (cache off in both, so every request runs
  the model), requests per second with C concurrent clients, interleaved repetitions.

    .venv/bin/python bench/cache_history.py --duration 5 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import ggufmaker  # noqa: E402
from conftest import free_port  # noqa: E402

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there, how are you?"}], "max_tokens": 16}


class Daemon:
    def __init__(self, model: Path, workdir: Path, name: str, history: bool, cache: bool) -> None:
        self.port = free_port()
        d = workdir / name
        d.mkdir()
        cfg = d / "anyad.toml"
        cfg.write_text(f'data_dir = "{d}"\n[history]\nenabled = {str(history).lower()}\n'
                       f'[cache]\nenabled = {str(cache).lower()}\n'
                       f'[models.tiny]\npath = "{model}"\npreload = true\nkeep_alive = -1\nmax_queue = 256\n')
        self.log = open(d / "log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "anyad", "serve", "--config", str(cfg), "--port",
                                      str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def ready(self, s: aiohttp.ClientSession) -> None:
        for _ in range(600):
            try:
                async with s.get(f"http://127.0.0.1:{self.port}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("anyad did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


async def one(s: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    async with s.post(url, json=body, headers=headers) as r:
        await r.read()
        assert r.status == 200, r.status
        return time.perf_counter() - t0, r.headers.get("X-Anyad-Cache", "")


async def latencies(s, url, body, headers, n: int) -> tuple[list[float], set[str]]:
    out, seen = [], set()
    for _ in range(n):
        dt, cache = await one(s, url, body, headers)
        out.append(dt)
        seen.add(cache)
    return out, seen


async def throughput(s, url, body, headers, clients: int, duration: float) -> float:
    done = 0
    end = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await one(s, url, body, headers)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--n", type=int, default=300, help="sequential requests for the latency percentiles")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = ggufmaker.write_model(work / "tiny.gguf")
        daemons = {"cache": Daemon(model, work, "cache", history=True, cache=True),
                   "history-on": Daemon(model, work, "on", history=True, cache=False),
                   "history-off": Daemon(model, work, "off", history=False, cache=False)}
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                for d in daemons.values():
                    await d.ready(s)
                det = {**BODY, "temperature": 0}
                url = daemons["cache"].url
                await one(s, url, det, {})
                await asyncio.sleep(0.3)  # the entry is written by the next batch
                hit_lat, hit_seen = await latencies(s, url, det, {}, args.n)
                miss_lat, miss_seen = await latencies(s, url, det, {"Cache-Control": "no-cache"}, args.n)
                assert hit_seen == {"hit"} and miss_seen == {"bypass"}, (hit_seen, miss_seen)
                hit_rps, miss_rps, on_rps, off_rps = [], [], [], []
                for _ in range(args.reps):
                    hit_rps.append(await throughput(s, url, det, {}, args.clients, args.duration))
                    miss_rps.append(await throughput(s, url, det, {"Cache-Control": "no-cache"}, args.clients,
                                                     args.duration))
                    off_rps.append(await throughput(s, daemons["history-off"].url, BODY, {}, args.clients,
                                                    args.duration))
                    on_rps.append(await throughput(s, daemons["history-on"].url, BODY, {}, args.clients,
                                                   args.duration))
        finally:
            for d in daemons.values():
                d.stop()
    med = statistics.median
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; tiny model, {BODY['max_tokens']} "
          f"tokens per answer; {args.n} sequential requests; {args.clients} clients x {args.duration:g} s x "
          f"{args.reps} reps (medians)\n")
    print("| | p50 ms | p99 ms | requests/s |")
    print("|---|---:|---:|---:|")
    print(f"| cache hit | {pct(hit_lat, 50) * 1000:.2f} | {pct(hit_lat, 99) * 1000:.2f} | {med(hit_rps):.0f} |")
    print(f"| miss (model runs) | {pct(miss_lat, 50) * 1000:.2f} | {pct(miss_lat, 99) * 1000:.2f} | "
          f"{med(miss_rps):.0f} |")
    print(f"\n| history | requests/s | vs off |\n|---|---:|---:|\n| off | {med(off_rps):.0f} | |\n"
          f"| on | {med(on_rps):.0f} | {(med(on_rps) / med(off_rps) - 1) * 100:+.1f} % |")
    print(f"\nper rep: hit {[round(x) for x in hit_rps]}, miss {[round(x) for x in miss_rps]}, "
          f"history off {[round(x) for x in off_rps]}, on {[round(x) for x in on_rps]}")


if __name__ == "__main__":
    asyncio.run(main())
