"""Write small llama-architecture GGUF files with random weights.

The tests (and ``bench/``) need a real model that real llama.cpp loads, with a
real byte-level BPE tokenizer and a ChatML chat template, but without any
download. Weights are random, so the text is noise; at temperature 0 it is
deterministic, which is all the tests rely on.

The output rows of every token that is not printable ASCII are zeroed, so that
greedy decoding keeps to readable characters and never picks an end-of-turn
token by itself: replies run until ``max_tokens`` or a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Fill-in-the-middle tokens, as Qwen2.5-Coder names them (only in a model written with fim=True).
FIM_SPECIALS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "r"), ("o", "n")]


@dataclass(frozen=True)
class Shape:
    n_embd: int = 64
    n_layer: int = 2
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 2048
    n_vocab_pad: int = 0  # extra unused tokens, to give the output layer a realistic size
    quant: str = "F16"  # or "Q8_0"; F32 matrices crash some llama.cpp CPU builds


TINY = Shape()
# Roughly Qwen2-0.5B: the shape the project measures speed on.
HALF_B = Shape(n_embd=896, n_layer=24, n_ff=4864, n_head=14, n_head_kv=2, n_ctx=32768,
               n_vocab_pad=151_936 - 256 - len(MERGES) - len(SPECIALS), quant="Q8_0")
# Roughly Llama-3.2-1B: wider, fewer layers, 4 query heads per KV head, a 128k vocabulary.
ONE_B = Shape(n_embd=2048, n_layer=16, n_ff=8192, n_head=32, n_head_kv=8, n_ctx=131072,
              n_vocab_pad=128_256 - 256 - len(MERGES) - len(SPECIALS), quant="Q8_0")
SHAPES = {"tiny": TINY, "half-b": HALF_B, "1b": ONE_B}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocabulary(shape: Shape, fim: bool = False) -> tuple[list[str], list[int], list[int]]:
    """Tokens, token types and the ids of printable-ASCII tokens."""
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    printable = [b for b in range(256) if 32 <= b < 127]
    for a, b in MERGES:
        printable.append(len(tokens))
        tokens.append(a + b)
    types = [1] * len(tokens)
    for s in SPECIALS + (FIM_SPECIALS if fim else []):
        tokens.append(s)
        types.append(3)
    for i in range(shape.n_vocab_pad):
        tokens.append(f"<|unused_{i}|>")
        types.append(5)
    return tokens, types, printable


def write_model(path: Path | str, shape: Shape = TINY, seed: int = 0, arch: str = "llama",
                chat_template: str = CHATML_TEMPLATE, fim: bool = False) -> Path:
    """Write the model; another ``arch`` gives a file llama.cpp parses but refuses to load.

    ``chat_template`` lets a test carry a real model family's template (tests/templates/);
    ``fim`` adds fill-in-the-middle tokens (a code model's).
    """
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types, printable = vocabulary(shape, fim)
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    n_embd_kv = head_dim * shape.n_head_kv

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"anyad-test-{shape.n_embd}x{shape.n_layer}")
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if fim:
        for key, name in zip(("pre", "suf", "mid"), FIM_SPECIALS):
            w.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", tokens.index(name))
    w.add_chat_template(chat_template)

    qtype = gguf.GGMLQuantizationType[shape.quant]
    w.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[shape.quant])

    def mat(name: str, rows: int, cols: int, scale: float | None = None, keep_rows=None) -> None:
        a = rng.standard_normal((rows, cols), dtype=np.float32) * (scale or 1.0 / np.sqrt(cols))
        if keep_rows is not None:
            keep = np.zeros(rows, dtype=bool)
            keep[keep_rows] = True
            a[~keep] = 0.0
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", n_vocab, shape.n_embd, scale=1.0)
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", shape.n_embd)
        mat(p + "attn_q.weight", shape.n_embd, shape.n_embd)
        mat(p + "attn_k.weight", n_embd_kv, shape.n_embd)
        mat(p + "attn_v.weight", n_embd_kv, shape.n_embd)
        mat(p + "attn_output.weight", shape.n_embd, shape.n_embd)
        vec(p + "ffn_norm.weight", shape.n_embd)
        mat(p + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        mat(p + "ffn_up.weight", shape.n_ff, shape.n_embd)
        mat(p + "ffn_down.weight", shape.n_embd, shape.n_ff)
    vec("output_norm.weight", shape.n_embd)
    mat("output.weight", n_vocab, shape.n_embd, keep_rows=printable)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = ap.parse_args()
    print(write_model(args.path, SHAPES[args.shape]))
