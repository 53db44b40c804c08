"""What a model load needs that ``llama_cpp.Llama`` takes no argument for: keeping the
weights as filed (no repacking), and flash attention's "auto"; and which engine a model
gets.

Repacking. On CPUs with AMX (``amx_tile`` in /proc/cpuinfo: Intel's Xeons since Sapphire Rapids)
the llama.cpp this package ships repacks Q4_0/Q8_0 weights for AMX, and its AMX kernels
then fault on the first matrix multiply (the tile configuration is optimised away, and
worker threads never ask the kernel for the tile state: llama.cpp's issue 20824 and its
open fix, pull request 26954), killing the model's worker on every request. There the
weights stay as the file has them: llama-server's ``--no-repack``.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any, Iterator


def advertises_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_tile" in line.split() for line in text.splitlines())


@contextlib.contextmanager
def without_repacking(llama_cpp: Any) -> Iterator[None]:
    """Models loaded inside keep their weights as the file has them. ``Llama`` takes its
    model parameters from ``llama_model_default_params``, which has no argument for it."""
    default = llama_cpp.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = default


@contextlib.contextmanager
def flash_attention_auto(llama_cpp: Any) -> Iterator[None]:
    """Contexts created inside leave flash attention to llama.cpp ("auto", llama-server's
    default: on where the device supports it for the model). ``Llama`` only knows on and
    off, and writes off as ``LLAMA_FLASH_ATTN_TYPE_DISABLED`` when told ``flash_attn=False``."""
    disabled = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    try:
        yield
    finally:
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED = disabled


def engine_for(setting: str, vision: bool) -> str:
    """The engine a model's ``engine`` setting gives: "batched" (one context, every sequence
    in it) or "slots" (one context per slot). "auto" is batched, except with a vision
    projector: images are evaluated into a slot's own context."""
    if setting == "auto":
        return "slots" if vision else "batched"
    return setting
