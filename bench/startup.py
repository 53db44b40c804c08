"""Start-up: from spawning a gateway to its readiness URL answering 200, side by side.

    .venv/bin/python bench/startup.py [--runs 5] [--litellm /tmp/litellm-venv/bin/litellm]

Each gateway is started ``--runs`` times, alternately, with a configuration that serves
only remote providers (nothing local to load): anyad with one provider, anyad with one
provider and a pool of four replicas, and LiteLLM's proxy with one model (its own
readiness URL, ``/health/readiness``), when its venv is there
(``bench/gateway_overhead.sh`` makes it). The clock starts before the process is spawned
and stops at the first 200; the readiness URL is polled every 5 ms. Nothing is sent
beyond 127.0.0.1, and no upstream needs to run: readiness does not ask them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.005


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anyad(tmp: Path, pool: bool) -> tuple[list[str], str, dict[str, str]]:
    port = free_port()
    cfg = tmp / f"anyad-{port}.toml"
    text = (f'data_dir = "{tmp / f"data-{port}"}"\n[server]\nport = {port}\nlog_level = "warning"\n'
            '[providers.up]\nbase_url = "http://127.0.0.1:9/v1"\n')
    if pool:
        text += ('[pools.fleet]\nmodel = "m"\nreplicas = ['
                 + ", ".join(f'"http://127.0.0.1:{9 + i}/v1"' for i in range(4)) + "]\n")
    cfg.write_text(text)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp / "xdg"), "XDG_DATA_HOME": str(tmp / "xdg-data")}
    return [sys.executable, "-m", "anyad", "serve", "--config", str(cfg)], f"http://127.0.0.1:{port}/ready", env


def litellm(exe: str, tmp: Path) -> tuple[list[str], str, dict[str, str]]:
    port = free_port()
    cfg = tmp / "litellm.yaml"
    cfg.write_text("model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
                   "      api_base: http://127.0.0.1:9/v1\n      api_key: sk-dummy-not-used\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": "sk-startup-bench-loopback", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_DOCS": "True"}
    return ([exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}/health/readiness", env)


def once(cmd: list[str], url: str, env: dict[str, str], limit_s: float = 120.0) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - t0 < limit_s:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(POLL_S)
        raise SystemExit(f"{url} not ready within {limit_s} s")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        gateways = {"anyad (one provider)": lambda: anyad(tmp, pool=False),
                    "anyad (a provider and a pool of 4)": lambda: anyad(tmp, pool=True)}
        if os.access(args.litellm, os.X_OK):
            gateways["litellm proxy (one model)"] = lambda: litellm(args.litellm, tmp)
        else:
            print(f"(no LiteLLM at {args.litellm}: skipped)")
        times: dict[str, list[float]] = {name: [] for name in gateways}
        for _ in range(args.runs):
            for name, make in gateways.items():
                times[name].append(once(*make()))
        print("| gateway | runs | median s | min s | max s |\n|---|---:|---:|---:|---:|")
        for name, ts in times.items():
            print(f"| {name} | {len(ts)} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")


if __name__ == "__main__":
    main()
