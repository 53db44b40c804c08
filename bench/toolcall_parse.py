"""What ReplyParser costs per streamed token.

A 2000-token reply fed one token at a time (tokens of 1-6 characters, as a BPE
tokenizer cuts English), in the shapes that matter: plain text with tools offered,
thinking then an answer, and text followed by a Hermes tool call. Prints the time
per token (median of the repetitions).

    .venv/bin/python bench/toolcall_parse.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from anyad.toolcalls import Family, ReplyParser

HERMES = Family("hermes", ("<think>", "</think>"), "enable_thinking")
WORDS = "the weather in Paris is < 20 degrees and [1] a <b>tag</b> or two, with {braces} too".split()


def tokens(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        w = " " + rng.choice(WORDS)
        while w and len(out) < n:
            k = rng.randint(1, 6)
            out.append(w[:k])
            w = w[k:]
    return out


def shapes(n: int) -> dict[str, list[str]]:
    call = '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps({"city": "Paris", "note": "x" * 200}) \
        + "}\n</tool_call>"
    call_tokens = [call[i:i + 3] for i in range(0, len(call), 3)]
    return {
        "plain text": tokens(n),
        "think then answer": ["<think>", "\n"] + tokens(n // 2) + ["\n", "</think>", "\n\n"] + tokens(n // 2, 1),
        "text then call": tokens(n - len(call_tokens)) + call_tokens,
    }


def per_token(toks: list[str], reps: int) -> float:
    times = []
    for _ in range(reps):
        p = ReplyParser(HERMES, tools=True, reasoning=True)
        t0 = time.perf_counter()
        for t in toks:
            p.feed(t)
        _, note = p.close()
        times.append((time.perf_counter() - t0) / len(toks))
        assert note is None and p.calls == ("<tool_call>" in "".join(toks))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for name, toks in shapes(args.tokens).items():
        print(f"{name:18s} {len(toks):5d} tokens  {per_token(toks, args.reps) * 1e6:6.2f} µs/token")


if __name__ == "__main__":
    main()
