"""What each front door costs: the daemon's CPU per request through chat completions,
Anthropic's Messages and OpenAI's Responses, to the same fake upstream.

    .venv/bin/python bench/door_overhead.py [--requests 2000] [--reps 5] [--concurrency 1 32]

The upstream is the shared harness's fake (``../shared/bench/gateway-overhead/upstream.py``:
a fixed chat-completion reply, or 20 SSE chunks); anyad serves it as provider ``up`` with
the defaults (history, audit and usage rows on), as ``bench/gateway_overhead.sh`` does.
The Messages and Responses doors translate to the provider's chat completions and back,
so the difference from the chat row is the door's own work: parsing its request, and
encoding its reply (or its event stream). CPU is the daemon's process tree (utime+stime,
the harness's ``proc_cpu``) over a run of N requests; the doors take turns within each
repetition, in a fresh order each time, and the table gives the median and p25-p75 over
the repetitions. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT.parent / "shared" / "bench" / "gateway-overhead"
sys.path.insert(0, str(HARNESS))
from local_throughput import free_port  # noqa: E402  (beside this script)
from proc_cpu import tree_cpu_seconds  # noqa: E402

ASK = "Say something short about benchmarks."
DOORS = {
    "chat": ("/v1/chat/completions",
             lambda stream: {"model": "up/bench", "messages": [{"role": "user", "content": ASK}],
                             "max_tokens": 32, "stream": stream},
             b'"choices"'),
    "messages": ("/v1/messages",
                 lambda stream: {"model": "up/bench", "messages": [{"role": "user", "content": ASK}],
                                 "max_tokens": 32, "stream": stream},
                 b'message_stop|"stop_reason"'),
    "responses": ("/v1/responses",
                  lambda stream: {"model": "up/bench", "input": ASK, "max_output_tokens": 32, "stream": stream},
                  b'response.completed|"output"'),
    # The same without keeping the response (store: false): what the stored row costs.
    "responses-nostore": ("/v1/responses",
                          lambda stream: {"model": "up/bench", "input": ASK, "max_output_tokens": 32, "stream": stream,
                                          "store": False},
                          b'response.completed|"output"'),
}


async def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited with {proc.returncode}")
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never answered")


async def run(session: aiohttp.ClientSession, url: str, body: bytes, marks: tuple[bytes, ...], n: int,
              concurrency: int) -> None:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                got = await r.read()
                if r.status != 200 or not any(m in got for m in marks):
                    raise SystemExit(f"{url}: HTTP {r.status}: {got[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def cell(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "–"
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{statistics.median(xs):.{digits}f} ({q[0]:.{digits}f}-{q[2]:.{digits}f})"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per door, mode and concurrency per rep")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--modes", nargs="+", default=["nonstream", "stream"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="anyad-doors-"))
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(HARNESS / "upstream.py"), str(up_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cfg = work / "anyad.toml"
    cfg.write_text(f'[server]\nport = {gw_port}\nlog_level = "warning"\n'
                   f'[providers.up]\nbase_url = "http://127.0.0.1:{up_port}/v1"\nmax_retries = 0\n')
    env = {**os.environ, "XDG_DATA_HOME": str(work / "data"), "XDG_CONFIG_HOME": str(work / "config")}
    daemon = subprocess.Popen([str(ROOT / ".venv" / "bin" / "anyad"), "serve", "--config", str(cfg)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(work / "anyad.log", "wb"),
                              start_new_session=True)
    cpu: dict[tuple[str, str, int], list[float]] = {}
    load0 = os.getloadavg()
    try:
        await wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        await wait_http(f"http://127.0.0.1:{gw_port}/health", daemon)
        base = f"http://127.0.0.1:{gw_port}"
        conn = aiohttp.TCPConnector(limit=max(args.concurrency), force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as session:
            cases = [(d, m, c) for d in DOORS for m in args.modes for c in args.concurrency]
            for d, m, c in cases:  # warm every path once (imports, caches, pools)
                path, make, marks = DOORS[d]
                await run(session, base + path, json.dumps(make(m == "stream")).encode(),
                          tuple(marks.split(b"|")), 50, c)
            for rep in range(args.reps):
                order = list(cases)
                random.Random(rep).shuffle(order)
                for d, m, c in order:
                    path, make, marks = DOORS[d]
                    body = json.dumps(make(m == "stream")).encode()
                    before = tree_cpu_seconds(daemon.pid)
                    await run(session, base + path, body, tuple(marks.split(b"|")), args.requests, c)
                    after = tree_cpu_seconds(daemon.pid)
                    cpu.setdefault((d, m, c), []).append((after - before) / args.requests * 1000)
                print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    finally:
        for p in (daemon, upstream):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
    load1 = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({"|".join(map(str, k)): v for k, v in cpu.items()}, indent=1))
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}, {args.requests} requests "
          f"x {args.reps} reps; load average {load0[0]:.2f} before, {load1[0]:.2f} after\n")
    print("| mode | C | door | anyad CPU ms/req | over chat (paired by rep) |")
    print("|---|---:|---|---:|---:|")
    for m in args.modes:
        for c in args.concurrency:
            chat = cpu[("chat", m, c)]
            for d in DOORS:
                xs = cpu[(d, m, c)]
                over = "–" if d == "chat" else cell([x - y for x, y in zip(xs, chat)]) + " ms"
                print(f"| {m} | {c} | {d} | {cell(xs)} | {over} |")


if __name__ == "__main__":
    asyncio.run(main())
