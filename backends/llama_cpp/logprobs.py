"""Log probabilities of sampled tokens, in OpenAI's shape, from the engine's logits.

Read from the last row of logits that llama.cpp computed (the one the sampler just
drew from), so no ``logits_all`` context is needed: a request that asks for none pays
nothing, one that asks pays a softmax over the vocabulary per token. The numbers are
the model's own distribution, before temperature, penalties, biases and grammar, as
llama.cpp's server reports them by default.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np


def piece_reader(llama_cpp: Any, vocab: Any) -> Callable[[int], bytes]:
    """A token's bytes as the model writes it (special tokens by their text)."""
    buf = ctypes.create_string_buffer(64)

    def piece(token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        if n < 0:  # longer than the buffer: -n is the length it needs
            big = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, big, len(big), 0, True)
            return big.raw[:max(n, 0)]
        return buf.raw[:n]

    return piece


class TokenLogprobs:
    """Entries for one reply: ``{"token", "logprob", "bytes", "top_logprobs": [...]}`` per token."""

    def __init__(self, top: int, piece: Callable[[int], bytes]) -> None:
        self.top = top
        self._piece = piece
        self._pieces: dict[int, tuple[str, list[int]]] = {}
        self.pending: list[dict[str, Any]] = []

    def _text(self, token: int) -> tuple[str, list[int]]:
        known = self._pieces.get(token)
        if known is None:
            raw = self._piece(token)
            # A token may be part of a UTF-8 character: its bytes say exactly what it is.
            known = self._pieces[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return known

    def add(self, logits: np.ndarray, token: int) -> None:
        peak = float(logits.max())
        log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        text, raw = self._text(token)
        alternatives = []
        if self.top:
            k = min(self.top, logits.shape[0])
            best = np.argpartition(logits, -k)[-k:]
            for tid in best[np.argsort(-logits[best], kind="stable")]:
                alt_text, alt_raw = self._text(int(tid))
                alternatives.append({"token": alt_text, "logprob": float(logits[tid]) - log_z, "bytes": alt_raw})
        self.pending.append({"token": text, "logprob": float(logits[token]) - log_z, "bytes": raw,
                             "top_logprobs": alternatives})

    def take(self) -> list[dict[str, Any]]:
        """The entries not yet sent; they go out with the next piece of the reply."""
        out, self.pending = self.pending, []
        return out
