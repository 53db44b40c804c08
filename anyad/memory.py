"""How much memory a GGUF model needs, from its own metadata, without loading it.

For a model with ``L`` blocks, context ``n_ctx`` and micro-batch ``n_ubatch``::

    W_i      = bytes of the tensors blk.i.*                     (weights of block i)
    W_out    = bytes of output.weight (token_embd.weight when tied) + output_norm.weight
    W_in     = bytes of token_embd.weight                       (always in host RAM)
    KV_i     = n_ctx * (n_head_kv * key_length + n_head_kv * value_length) * b(cache type)
               with b(f16) = 2, b(q8_0) = 34/32, b(q4_0) = 18/32, b(f32) = 4
    compute  = 4 * max( n_ubatch * (n_vocab + 2 * n_embd),      (logits of a whole micro-batch)
                        n_ubatch * n_ctx * (n_head + 1)         (attention scores and mask)
                        + n_ubatch * (3 * n_embd + 2 * n_embd_kv) )
               + 4 * n_vocab                                    (output buffer)
               + 6 MiB                                          (graph allowance)

    all on the CPU:   RAM  = W_in + Σ W_i + W_out + P * (Σ KV_i + compute) + R
    k > 0 on the GPU: VRAM = P * (W_out + Σ_{i ≥ L-k+1} (W_i + KV_i) + compute) + G_dev
                      RAM  = W_in + Σ_{i < L-k+1} (W_i + KV_i) + P * 16 MiB + G_host + R * (CPU share)

``k`` counts as llama.cpp's ``n_gpu_layers`` does: the output layer goes first, then
the blocks from the last one down, so ``L + 1`` is the whole model (Ollama's "25/25").
``G_dev`` and ``G_host`` are what a process pays once for using a GPU at all (the
CUDA context, cuBLAS workspaces, the runtime's host-side memory): measured at 686
and 290-380 MiB on an H100 with CUDA 13 (bench/README.md), used as 700 and 380.
``R`` is the second copy of the quantized weights that llama.cpp makes on CPUs with
AMX (``0.9 *`` the repackable bytes, as measured); 0 elsewhere.

``P`` is the model's ``parallel`` setting. With the slots engine each slot is a context
of its own: on the CPU the weights are memory-mapped once and shared by the contexts;
on a GPU each context holds its own copy of the offloaded layers. With the batched
engine (``shared``) one context holds every sequence: the KV cache is still ``P``
sequences of ``n_ctx`` cells, but there is one compute buffer, sized for attention over
all ``P * n_ctx`` cells, and one copy of the offloaded layers::

    shared, all on the CPU: RAM  = W_in + Σ W_i + W_out + P * Σ KV_i + compute(P * n_ctx) + R
    shared, k > 0:          VRAM = W_out + Σ_{i ≥ L-k+1} W_i + P * Σ_{i ≥ L-k+1} KV_i + compute(P * n_ctx) + G_dev

The tensor sizes are exact (read from the tensor table). The compute term follows
how llama.cpp sizes its compute buffer: it reserves for the worst micro-batch, in
which every token is an output (so the logits of ``n_ubatch`` tokens) and, without
flash attention (llama-cpp-python's default), the full attention-score matrix; the
buffer is the larger of the two, since the allocator reuses memory between them.
``bench/`` compares the estimate with what llama.cpp allocates and with RSS/VRAM.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anyad.gguf_meta import gguf_scalar

KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "q5_0": 22 / 32, "q5_1": 24 / 32}
MIB = 2 ** 20
SCRATCH = 16 * MIB  # host-side buffers of a model whose layers are on a GPU
COMPUTE_ALLOWANCE = 6 * MIB
GPU_DEVICE_OVERHEAD = 700 * MIB
GPU_HOST_OVERHEAD = 380 * MIB
# llama.cpp's CPU backend repacks these quantizations for AMX (Xeon 4th generation and later).
AMX_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}
REPACK_FACTOR = 0.9


@dataclass(frozen=True, slots=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_vocab: int
    layer_bytes: tuple[int, ...]
    output_bytes: int
    input_bytes: int
    trained_ctx: int | None
    # Weights in a quantization the CPU's AMX kernels repack (blocks and output layer).
    repackable_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Estimate:
    shape: ModelShape
    n_ctx: int
    kv_layer_bytes: int
    compute_bytes: int
    parallel: int = 1
    # The CPU repacks quantized weights into its own layout (AMX): a second copy in RAM.
    repack: bool = False
    # A vision projector's weights: one copy, on the GPU when the model has layers there.
    projector_bytes: int = 0
    # One context for every sequence (the batched engine): one compute buffer, one copy of
    # the offloaded layers.
    shared: bool = False
    # The prompt cache's RAM tier, at its cap.
    prompt_cache_bytes: int = 0

    @property
    def n_offload(self) -> int:
        """All of the model, in llama.cpp's ``n_gpu_layers`` count: every block and the output layer."""
        return self.shape.n_layer + 1

    def ram_bytes(self, gpu_layers: int = 0) -> int:
        s = self.shape
        k = max(0, min(gpu_layers, self.n_offload))
        gpu_blocks = max(0, k - 1)  # llama.cpp offloads the output layer first, then the last blocks
        cpu_blocks = s.n_layer - gpu_blocks
        ram = s.input_bytes + sum(s.layer_bytes[:cpu_blocks]) + (0 if k else s.output_bytes)
        if self.repack:
            cpu_share = cpu_blocks / s.n_layer if s.n_layer else 1.0
            ram += int(REPACK_FACTOR * s.repackable_bytes * cpu_share)
        buffers = (self.compute_bytes if k == 0 else SCRATCH) * self.contexts
        return ram + self.parallel * cpu_blocks * self.kv_layer_bytes + buffers + self.prompt_cache_bytes + \
            (GPU_HOST_OVERHEAD if k else self.projector_bytes)

    def vram_bytes(self, gpu_layers: int) -> int:
        s = self.shape
        k = max(0, min(gpu_layers, self.n_offload))
        if k == 0:
            return 0
        blocks = k - 1
        weights = sum(s.layer_bytes[s.n_layer - blocks:]) + s.output_bytes
        kv = blocks * self.kv_layer_bytes
        return self.contexts * (weights + self.compute_bytes) + self.parallel * kv + GPU_DEVICE_OVERHEAD + \
            self.projector_bytes

    def vram_split(self, shares: Sequence[float]) -> list[int]:
        """VRAM on each GPU for the whole model split over them by layers, as llama.cpp's
        ``tensor_split`` splits it: block ``i`` on the GPU whose running share first passes
        ``(i + ½) / L``, the output layer on the last; each GPU pays its own compute buffer
        and CUDA context."""
        s = self.shape
        total = sum(shares)
        bounds = list(itertools.accumulate(x / total for x in shares))
        out = [0] * len(shares)
        for i in range(s.n_layer):
            j = next((d for d, b in enumerate(bounds) if (i + 0.5) / s.n_layer < b), len(shares) - 1)
            out[j] += self.contexts * s.layer_bytes[i] + self.parallel * self.kv_layer_bytes
        out[-1] += self.contexts * s.output_bytes
        return [b + self.device_fixed_bytes + (self.projector_bytes if d == 0 else 0) for d, b in enumerate(out)]

    @property
    def contexts(self) -> int:
        """llama.cpp contexts, each with its own compute buffer (and on a GPU its own copy of
        the offloaded layers): one shared, or one per slot."""
        return 1 if self.shared else self.parallel

    @property
    def device_fixed_bytes(self) -> int:
        """What each GPU that holds layers pays whatever its share: compute buffers, CUDA context."""
        return self.compute_bytes * self.contexts + GPU_DEVICE_OVERHEAD

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes(0)


def read_shape(path: Path) -> ModelShape:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def val(key: str, default=None):
        return gguf_scalar(r, key, default)

    arch = val("general.architecture")
    n_layer = int(val(f"{arch}.block_count"))
    n_embd = int(val(f"{arch}.embedding_length"))
    n_head = int(val(f"{arch}.attention.head_count"))
    n_head_kv = int(val(f"{arch}.attention.head_count_kv", n_head))
    head_dim = n_embd // n_head
    layer = [0] * n_layer
    out = inp = 0
    out_weight = False
    n_vocab = 0
    repackable = 0
    for t in r.tensors:
        name, size = t.name, int(t.n_bytes)
        if (name.startswith("blk.") or name == "output.weight") and len(t.shape) == 2 \
                and t.tensor_type.name in AMX_TYPES:
            repackable += size
        if name.startswith("blk."):
            layer[int(name.split(".")[1])] += size
        elif name == "token_embd.weight":
            inp += size
            n_vocab = int(t.shape[-1])
        elif name.startswith("output"):
            out += size
            out_weight = out_weight or name == "output.weight"
        else:
            inp += size  # position embeddings and the like stay with the input
    if not out_weight:  # tied embeddings: the output layer reuses token_embd
        out += inp
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        n_vocab = len(tokens.data)
    return ModelShape(
        n_layer=n_layer, n_embd=n_embd, n_ff=int(val(f"{arch}.feed_forward_length", 4 * n_embd)), n_head=n_head,
        n_head_kv=n_head_kv, key_length=int(val(f"{arch}.attention.key_length", head_dim)),
        value_length=int(val(f"{arch}.attention.value_length", head_dim)), n_vocab=n_vocab,
        layer_bytes=tuple(layer), output_bytes=out, input_bytes=inp,
        trained_ctx=val(f"{arch}.context_length"), repackable_bytes=repackable)


def estimate(shape: ModelShape, n_ctx: int, *, n_ubatch: int = 512, cache_type: str = "f16",
             parallel: int = 1, repack: bool = False, projector_bytes: int = 0, shared: bool = False,
             prompt_cache_bytes: int = 0) -> Estimate:
    per_elem = KV_BYTES[cache_type]
    kv = int(n_ctx * shape.n_head_kv * (shape.key_length + shape.value_length) * per_elem)
    cells = n_ctx * parallel if shared else n_ctx  # what one micro-batch attends over
    ub = min(n_ubatch, cells)
    n_embd_kv = shape.n_head_kv * shape.key_length
    logits = ub * (shape.n_vocab + 2 * shape.n_embd)
    attention = ub * cells * (shape.n_head + 1) + ub * (3 * shape.n_embd + 2 * n_embd_kv)
    compute = 4 * max(logits, attention) + 4 * shape.n_vocab + COMPUTE_ALLOWANCE
    return Estimate(shape=shape, n_ctx=n_ctx, kv_layer_bytes=kv, compute_bytes=compute, parallel=parallel,
                    repack=repack, projector_bytes=projector_bytes, shared=shared,
                    prompt_cache_bytes=prompt_cache_bytes)
