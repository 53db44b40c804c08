"""Write tiny LLaVA-style vision projector ("mmproj") GGUF files with random weights.

The companion of ``ggufmaker``: a CLIP-like image encoder followed by LLaVA's two-layer
MLP projector (``clip.projector_type = "mlp"``), laid out with the keys and tensor names
llama.cpp's ``clip.cpp`` loads and marked as llama.cpp's converter marks a projector
(``general.architecture = "clip"``, ``general.type = "mmproj"``). Its output width must
equal the text model's ``n_embd``; llama.cpp refuses the pair otherwise.

The default shape takes a 32x32 image in 8-pixel patches: 16 image tokens, one encoder
layer computed (LLaVA reads the second-to-last of two), so encoding an image costs
well under a millisecond of arithmetic. Weights are random, so the model "sees" noise,
but different images give different embeddings, which is what the tests rely on.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ggufmaker import TINY

# CLIP's own normalisation, as LLaVA-1.5's preprocessor_config.json carries it.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionShape:
    image_size: int = 32
    patch_size: int = 8
    n_embd: int = 32  # the encoder's width, not the text model's
    n_layer: int = 2  # LLaVA takes the features of layer n_layer - 1: one layer is computed
    n_ff: int = 64  # must differ from n_embd: clip.cpp swaps up/down of old files by shape
    n_head: int = 2
    n_proj_hidden: int = 64  # the MLP projector's hidden width

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


TINY_VISION = VisionShape()


def mmproj_name(model_path: Path | str) -> str:
    """The file name that pairs a projector with ``model_path``: ``mmproj-<stem>.gguf`` next to it.

    llama.cpp's converter writes ``mmproj-<name>-<type>.gguf``; llama-server, LM Studio and
    Hugging Face downloads pair any GGUF with "mmproj" in its name found beside the model.
    """
    return f"mmproj-{Path(model_path).stem}.gguf"


def make_mmproj(path: Path | str, n_embd: int = TINY.n_embd, shape: VisionShape = TINY_VISION,
                seed: int = 0) -> Path:
    """Write the projector; ``n_embd`` is the width of its output (the text model's n_embd)."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    s = shape

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(f"anyad-test-mmproj-{s.image_size}px-{n_embd}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
    w.add_vision_projection_dim(n_embd)
    w.add_vision_image_size(s.image_size)
    w.add_vision_patch_size(s.patch_size)
    w.add_vision_embedding_length(s.n_embd)
    w.add_vision_feed_forward_length(s.n_ff)
    w.add_vision_block_count(s.n_layer)
    w.add_vision_head_count(s.n_head)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean(list(IMAGE_MEAN))
    w.add_vision_image_std(list(IMAGE_STD))
    w.add_vision_use_gelu(True)

    def mat(name: str, *dims: int) -> None:
        # numpy order is ggml's reversed: (rows, cols) is ne = [cols, rows]. F16 like the
        # text model's matrices: F32 matrices crash some llama.cpp CPU builds.
        fan_in = int(np.prod(dims[1:]))
        a = rng.standard_normal(dims, dtype=np.float32) / np.sqrt(fan_in)
        w.add_tensor(name, a.astype(np.float16))

    def vec(name: str, n: int, value: float | None = None) -> None:
        a = np.full(n, value, dtype=np.float32) if value is not None \
            else rng.standard_normal(n, dtype=np.float32) * 0.02
        w.add_tensor(name, a)

    # A conv2d kernel with stride = patch size: ne = [patch, patch, 3, n_embd].
    mat("v.patch_embd.weight", s.n_embd, 3, s.patch_size, s.patch_size)
    vec("v.patch_embd.bias", s.n_embd)
    w.add_tensor("v.position_embd.weight",
                 rng.standard_normal((s.n_patches, s.n_embd), dtype=np.float32) * 0.1)
    for i in range(s.n_layer):
        p = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            mat(p + t + ".weight", s.n_embd, s.n_embd)
            vec(p + t + ".bias", s.n_embd)
        for t in ("ln1", "ln2"):
            vec(p + t + ".weight", s.n_embd, 1.0)
            vec(p + t + ".bias", s.n_embd, 0.0)
        mat(p + "ffn_up.weight", s.n_ff, s.n_embd)
        vec(p + "ffn_up.bias", s.n_ff)
        mat(p + "ffn_down.weight", s.n_embd, s.n_ff)
        vec(p + "ffn_down.bias", s.n_embd)
    # LLaVA's projector: mm.0 (encoder width -> hidden), GELU, mm.2 (hidden -> text n_embd).
    mat("mm.0.weight", s.n_proj_hidden, s.n_embd)
    vec("mm.0.bias", s.n_proj_hidden)
    mat("mm.2.weight", n_embd, s.n_proj_hidden)
    vec("mm.2.bias", n_embd)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Test images, written by hand (no imaging library in the test environment).

def png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """An 8-bit RGB PNG, written by hand (no imaging library in the test environment)."""
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


RED = png(16, 16, lambda x, y: (255, 0, 0))
# Not square, to go through the projector's resize and padding.
STRIPES = png(40, 24, lambda x, y: ((x * 37) % 256, (y * 53) % 256, ((x + y) * 11) % 256))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--n-embd", type=int, default=TINY.n_embd,
                    help="the text model's embedding width (default: ggufmaker's tiny model)")
    args = ap.parse_args()
    print(make_mmproj(args.path, n_embd=args.n_embd))
