"""Tool calling on a local model: anyad vs llama.cpp's own server (llama-server).

Same GGUF (``half-b`` random weights from ``tests/ggufmaker.py`` carrying Qwen2.5's
real chat template, a Hermes ``<tool_call>`` template), same three function schemas,
same prompt, same sampling, 2 threads and one slot each, everything on 127.0.0.1.

    B=$(PYTHON=$PWD/.venv/bin/python ../shared/bench/llama-server/build.sh | tail -1)
    .venv/bin/python bench/toolcall_ttft.py --llama-server $B/bin/llama-server --reps 5

Three series, each interleaved over the repetitions (a fresh order per repetition):

- ``auto``: first-token time, streaming, ``tools`` offered with ``tool_choice: "auto"``,
  for each server, and the same chat without tools (what the tools cost each server:
  mostly the longer prompt the template writes with them);
- ``required``: a forced call (``tool_choice: "required"``, one call), first-token time
  and total time of a bounded ``max_tokens`` request;
- ``decode``: tokens/s with the tools offered (the reply parser active) against the same
  request without tools whose system message carries the tools block verbatim, so both
  read the same prompt tokens and decode over the same context length: the difference is
  the tool-call handling alone.

Every prompt starts with a distinct tag of one length, so no contender gets a KV-cache
prefix hit (the tag sits in the first line; everything after it is read again).
"first event" is the first SSE chunk of any kind; "first token" the first chunk that
carries content, reasoning or a tool call; decode tok/s is the reply's tokens (from
``usage``) after the first, over the time from the first token to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from local_throughput import ROOT, SAMPLING, HTTPContender, free_port, messages

TEMPLATE = ROOT / "tests" / "templates" / "hermes-qwen2.5-7b-instruct.jinja"
WORK = Path("/tmp/anyad-bench")

# Three schemas of the kind agents send. Bounded strings, arrays and closed objects (as in
# OpenAI's strict mode) so that a forced call from a random-weight model ends inside
# max_tokens; no <, >, & or ' in the text, which a template's tojson may escape differently.
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather and a short forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, optionally with the country, e.g. Oslo, Norway",
                     "maxLength": 32},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7, "description": "Days of forecast to include"}},
            "required": ["city", "unit", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_flights",
        "description": "Search scheduled flights between two airports on a given date.",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string", "description": "IATA code of the departure airport, e.g. OSL",
                       "minLength": 3, "maxLength": 3},
            "destination": {"type": "string", "description": "IATA code of the arrival airport, e.g. LHR",
                            "minLength": 3, "maxLength": 3},
            "date": {"type": "string", "format": "date", "description": "Departure date, YYYY-MM-DD"},
            "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
            "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]}},
            "required": ["origin", "destination", "date", "passengers", "cabin"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "create_event",
        "description": "Add an event to the user calendar and invite attendees by email.",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string", "description": "Short title of the event", "maxLength": 48},
            "start": {"type": "string", "format": "date-time", "description": "Start time, ISO 8601"},
            "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
            "attendees": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 3,
                          "description": "Email addresses of the people to invite"}},
            "required": ["title", "start", "duration_minutes", "attendees"], "additionalProperties": False}}},
]
PROMPT = ("What is the weather in Oslo for the next three days, and is there a flight from Oslo to "
          "London on Friday for two people?")


@dataclasses.dataclass
class Sample:
    first_event: float
    first_token: float
    total: float
    tokens: int
    prompt_tokens: int
    decode_tps: float
    finish: str | None
    calls: list[str]
    engine: dict[str, Any] | None  # llama-server's own timings (prompt_ms, predicted_ms, ...)


async def stream(c: HTTPContender, body: dict[str, Any]) -> Sample:
    """One streamed chat request, timed from the request to each kind of chunk."""
    body = {"model": c.model_id, "stream": True, "stream_options": {"include_usage": True}, **SAMPLING, **body}
    t0 = time.perf_counter()
    first_event = first = last = None
    usage: dict[str, Any] = {}
    finish = engine = None
    calls: list[str] = []
    async with c.session.post(f"http://127.0.0.1:{c.port}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            first_event = first_event or now
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            engine = ev.get("timings") or engine
            for ch in ev.get("choices") or ():
                d = ch.get("delta") or {}
                finish = ch.get("finish_reason") or finish
                if d.get("content") or d.get("reasoning_content") or d.get("tool_calls"):
                    last = now
                    first = first or now
                for tc in d.get("tool_calls") or ():
                    if (tc.get("function") or {}).get("name"):
                        calls.append(tc["function"]["name"])
    total = time.perf_counter() - t0
    n = int(usage.get("completion_tokens") or 0)
    first, last = first or t0 + total, last or t0 + total
    return Sample(first_event - t0, first - t0, total, n, int(usage.get("prompt_tokens") or 0),
                  (n - 1) / (last - first) if n > 1 and last > first else 0.0, finish, calls, engine)


def tools_block() -> str:
    """What the template appends to the system message when tools are offered, rendered the
    way anyad's worker renders it (llama-cpp-python's Jinja2 formatter)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    marker = "\x00"
    fmt = Jinja2ChatFormatter(template=TEMPLATE.read_text(), eos_token="<|im_end|>", bos_token="<|endoftext|>")
    prompt = fmt(messages=[{"role": "system", "content": marker}, {"role": "user", "content": PROMPT}],
                 tools=TOOLS, tool_choice="auto").prompt
    return prompt.split(marker, 1)[1].split("<|im_end|>", 1)[0]


# variant name -> (extra request fields, whether the system message carries the tools block)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "tools auto": ({"tools": TOOLS, "tool_choice": "auto"}, False),
    "no tools": ({}, False),
    "required": ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, False),
    "no tools, same prompt": ({}, True),
}
SERIES: dict[str, tuple[str, ...]] = {
    "auto": ("tools auto", "no tools"),
    "required": ("required",),
    "decode": ("tools auto", "no tools, same prompt"),
}


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def cell(xs: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """Median, and the middle half of the samples (p25-p75) as the spread."""
    return (f"{statistics.median(xs) * scale:.{digits}f} ({q(xs, 0.25) * scale:.{digits}f}-"
            f"{q(xs, 0.75) * scale:.{digits}f})")


def paired(a: list[Sample], b: list[Sample], f) -> str:
    """a/b per repetition (the two ran next to each other, under the same load), as a median
    and p25-p75 in percent: steadier than a ratio of medians on a machine whose load drifts."""
    r = [f(x) / f(y) * 100 for x, y in zip(a, b) if f(y)]
    return cell(r, 1, 1) + " %" if r else "–"


def find_llama_server() -> Path | None:
    hits = sorted(glob.glob("/tmp/llama-server/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-server"))
    return Path(hits[-1]) if hits else None


async def main() -> None:
    import ggufmaker
    import psutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", type=Path, default=find_llama_server(),
                    help="the binary (default: what ../shared/bench/llama-server/build.sh built in /tmp)")
    ap.add_argument("--server-args", default="", help="more llama-server options, e.g. '-fa off'")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--series", default="auto,required,decode", help="which series, comma-separated")
    ap.add_argument("--ttft-tokens", type=int, default=4, help="max_tokens of the auto series")
    ap.add_argument("--forced-tokens", type=int, default=384, help="max_tokens of the required series")
    ap.add_argument("--decode-tokens", type=int, default=128, help="max_tokens of the decode series")
    ap.add_argument("--fa-off-series", default="auto",
                    help="series that also run llama-server with flash attention off (empty: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--json", type=Path, help="write every sample here")
    args = ap.parse_args()
    if not args.llama_server or not args.llama_server.exists():
        sys.exit("no llama-server binary: build it with ../shared/bench/llama-server/build.sh, or pass --llama-server")
    series = [s for s in args.series.split(",") if s]

    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "half-b-qwen25.gguf"
    if not model.exists():
        print(f"writing {model} (random weights, half-b, Qwen2.5's template) …", flush=True)
        ggufmaker.write_model(model, ggufmaker.HALF_B, chat_template=TEMPLATE.read_text())
    block = tools_block()
    load0 = os.getloadavg()

    port = free_port()
    cfg = WORK / "toolcall-anyad.toml"
    # The response cache off: an answer stored by an earlier run (same tags) would come back in
    # milliseconds. History, audit and usage stay as a user has them.
    cfg.write_text(f'[server]\nport = {port}\n[cache]\nenabled = false\n[models."{model.stem}"]\npath = "{model}"\n'
                   f'n_ctx = {args.n_ctx}\nn_threads = {args.threads}\nparallel = 1\nkeep_alive = -1\n')
    os.environ["ANYAD_DATA_DIR"] = str(WORK / "toolcall-data")
    anyad = HTTPContender("anyad", [sys.executable, "-m", "anyad", "serve", "--config", str(cfg)], port, model.stem)

    def llama_server(name: str, extra: list[str]) -> HTTPContender:
        port = free_port()
        # Its defaults otherwise (flash attention "auto", batch 2048/512, its prompt cache in RAM):
        # what a user of llama-server gets. --jinja: the model's own template, with the tools.
        return HTTPContender(name, [str(args.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port",
                                    str(port), "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.n_ctx),
                                    "-np", "1", "--jinja", *shlex.split(args.server_args), *extra], port, model.stem)

    server = llama_server("llama-server", [])
    contenders = [anyad, server]
    # Which series each contender runs in; the flash-attention-off server shows how much of a
    # difference is the engine's configuration (anyad's worker runs llama.cpp without it).
    only: dict[str, list[str]] = {}
    fa_off = [x for x in args.fa_off_series.split(",") if x in series]
    if fa_off:
        contenders.append(llama_server("llama-server -fa off", ["-fa", "off"]))
        only[contenders[-1].name] = fa_off
    samples: dict[str, dict[str, list[Sample]]] = {}
    try:
        await anyad.wait_ready("/ready")
        for c in contenders[1:]:
            await c.wait_ready("/health")
        # Do both render the same prompt? llama-server shows its own; anyad's is llama-cpp-python's Jinja2.
        async with server.session.post(f"http://127.0.0.1:{server.port}/apply-template", json={
                "messages": messages("x-0-0000", PROMPT), "tools": TOOLS, "tool_choice": "auto"}) as r:
            theirs = (await r.json()).get("prompt", "") if r.status == 200 else ""
        ours = theirs and theirs.split("[x-0-0000] You are a helpful assistant.", 1)[-1].split("<|im_end|>", 1)[0]
        same_render = ours == block
        for c in contenders:  # page the weights in, build the graphs, load anyad's worker
            await stream(c, {"messages": messages(f"w-{contenders.index(c)}-0000", PROMPT), "max_tokens": 8})

        limits = {"auto": args.ttft_tokens, "required": args.forced_tokens, "decode": args.decode_tokens}
        for kind in series:
            runs = [(c, v) for c in contenders for v in SERIES[kind] if kind in only.get(c.name, series)]
            for name in {f"{c.name} | {v}" for c, v in runs}:
                samples.setdefault(kind, {})[name] = []
            for rep in range(args.reps):
                order = runs[:]
                random.Random(f"{kind}{rep}").shuffle(order)
                for c, v in order:
                    extra, same_prompt = VARIANTS[v]
                    # Same-length tags: series letter, run index, repetition.
                    tag = f"{kind[0]}-{runs.index((c, v))}-{rep:04d}"
                    msgs = messages(tag, PROMPT)
                    if same_prompt:
                        msgs[0]["content"] += block
                    s = await stream(c, {"messages": msgs, "max_tokens": limits[kind], **extra})
                    samples[kind][f"{c.name} | {v}"].append(s)
                    print(f"{kind:8s} {rep} {c.name:20s} {v:22s} event {s.first_event * 1000:7.1f} first "
                          f"{s.first_token * 1000:7.1f} total {s.total * 1000:7.1f} ms  {s.prompt_tokens}+{s.tokens} "
                          f"tok  {s.decode_tps:5.2f} tok/s  {s.finish} {','.join(s.calls)}", flush=True)
    finally:
        for c in contenders:
            if c.session:
                await c.session.close()
            c.close()
    load1 = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps({k: {n: [dataclasses.asdict(s) for s in v] for n, v in d.items()}
                                         for k, d in samples.items()}, indent=1))

    def col(kind: str, name: str, f) -> list[float]:
        return [f(s) for s in samples[kind][name]]

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, {psutil.cpu_count(logical=False)} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
          f"{args.threads} threads each; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print(f"model: {model.name} ({model.stat().st_size / 2**20:.0f} MiB); llama-server {args.llama_server} "
          f"{args.server_args}; reps {args.reps}; tools block rendered the same by both: {same_render}")
    print("cells: median (p25-p75)")
    if "auto" in samples:
        print(f"\n(a) tool_choice auto, max_tokens {args.ttft_tokens}\n")
        print("| server | request | prompt tokens | first event ms | first token ms | engine prompt ms |")
        print("|---|---|---:|---:|---:|---:|")
        for name in sorted(samples["auto"]):
            eng = [s.engine["prompt_ms"] / 1000 for s in samples["auto"][name] if s.engine]
            print(f"| {name} | {samples['auto'][name][0].prompt_tokens} | "
                  f"{cell(col('auto', name, lambda s: s.first_event), 1000)} | "
                  f"{cell(col('auto', name, lambda s: s.first_token), 1000)} | {cell(eng, 1000) if eng else '–'} |")
        med = {n: statistics.median(col("auto", n, lambda s: s.first_token)) for n in samples["auto"]}
        a = med.get("anyad | tools auto")
        print()
        for c in contenders[1:]:
            b = med.get(f"{c.name} | tools auto")
            if a and b:
                pr = paired(samples["auto"]["anyad | tools auto"], samples["auto"][f"{c.name} | tools auto"],
                            lambda s: s.first_token)
                print(f"anyad vs {c.name}, first token with tools: {(a / b - 1) * 100:+.1f} % "
                      f"({(a - b) * 1000:+.0f} ms); anyad's as a share of {c.name}'s, paired by repetition: {pr}")
        for c in contenders:
            t, n = med.get(f"{c.name} | tools auto"), med.get(f"{c.name} | no tools")
            if t and n:
                print(f"what the tools cost {c.name}: {(t - n) * 1000:+.0f} ms of first-token time")
    if "required" in samples:
        print(f"\n(b) tool_choice required, one call, max_tokens {args.forced_tokens}\n")
        print("| server | request | first event ms | first token ms | total ms | reply tokens | ms/token after the "
              "first event | engine ms/token | tool calls returned |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in sorted(samples["required"]):
            ss = samples["required"][name]
            per = [(s.total - s.first_event) / max(1, s.tokens - 1) for s in ss]
            eng = [s.engine["predicted_per_token_ms"] / 1000 for s in ss if s.engine]
            print(f"| {name} | {cell(col('required', name, lambda s: s.first_event), 1000)} | "
                  f"{cell(col('required', name, lambda s: s.first_token), 1000)} | "
                  f"{cell(col('required', name, lambda s: s.total), 1000)} | "
                  f"{cell(col('required', name, lambda s: s.tokens))} | {cell(per, 1000, 1)} | "
                  f"{cell(eng, 1000, 1) if eng else '–'} | {sum(1 for s in ss if s.calls)}/{len(ss)} |")
    if "decode" in samples:
        print(f"\n(c) decode, max_tokens {args.decode_tokens}\n")
        print("| server | request | prompt tokens | reply tokens | decode tok/s | vs same prompt without tools "
              "(ratio of medians; paired by repetition) | engine tok/s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name in sorted(samples["decode"]):
            tps = statistics.median(col("decode", name, lambda s: s.decode_tps))
            ref = samples["decode"].get(name.split(" | ")[0] + " | no tools, same prompt")
            ratio = tps / statistics.median(s.decode_tps for s in ref) * 100 if ref else float("nan")
            pr = paired(samples["decode"][name], ref, lambda s: s.decode_tps) if ref else "–"
            eng = [s.engine["predicted_per_second"] for s in samples["decode"][name] if s.engine]
            print(f"| {name} | {samples['decode'][name][0].prompt_tokens} | "
                  f"{cell(col('decode', name, lambda s: s.tokens))} | "
                  f"{cell(col('decode', name, lambda s: s.decode_tps), 1, 2)} | {ratio:.1f} %; {pr} | "
                  f"{cell(eng, 1, 2) if eng else '–'} |")


if __name__ == "__main__":
    asyncio.run(main())
