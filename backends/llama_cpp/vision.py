"""Images in a local model's prompt, through llama.cpp's multimodal library (libmtmd).

A ``Vision`` owns one mtmd context: the vision projector (an ``mmproj`` GGUF) bound to
a loaded text model. ``eval_prompt`` tokenizes a rendered prompt whose image places hold
``media_marker``, evaluates text and images into a ``llama_cpp.Llama``'s context, and
returns the tokens to hand to ``create_completion``. It leaves the ``Llama`` as its own
``eval`` would have: ``input_ids[:n_tokens]`` equal to the returned tokens and the last
position's logits live, so llama-cpp-python's prefix match finds the whole prompt and
samples at once instead of evaluating it again.

An image has no token ids, so its positions in ``input_ids`` hold negative stand-ins
derived from the image's SHA-256 (llama.cpp sets it as the chunk id). No real token
is negative, so a later text-only prompt never matches into an image's positions (the
stale ids the library's own handler leaves there can); the same image in the same
place, as every turn of a chat resends it, matches, and its encoding is reused.

Imported lazily by the worker: libmtmd exists only in llama-cpp-python builds made with
``-DLLAVA_BUILD=ON``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

# 8K UHD. stb_image allocates the whole decoded bitmap (3 bytes a pixel, more while a
# PNG inflates) before the projector shrinks it to a few hundred pixels a side, so a
# small file declaring a huge canvas could otherwise take the worker's memory.
MAX_PIXELS = 7680 * 4320
T = TypeVar("T")

_ERROR_LEVEL = 4  # GGML_LOG_LEVEL_ERROR (ggml.h; llama_cpp._logger's table predates its renumbering)
_NO_FFMPEG = os.path.join(os.devnull, "").encode()  # "/dev/null/": no file can live under it


class ImageError(ValueError):
    """A request the model cannot take: an image it cannot read, images that do not match
    the prompt's markers, or a prompt that does not fit the context.

    ``code`` and ``param`` are what the worker reports back (OpenAI's error fields).
    """

    def __init__(self, message: str, code: str = "invalid_image", param: str = "messages") -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class ProjectorError(RuntimeError):
    """The projector file did not load against this text model (llama.cpp's reason inside)."""


class Prompt(NamedTuple):
    tokens: list[int]  # for create_completion: one entry per position, images as stand-ins
    n_positions: int  # what usage.prompt_tokens counts
    n_cached: int  # positions reused from the context without evaluating them again


def unavailable_reason() -> str | None:
    """Why images cannot work in this install (no libmtmd), or None when they can."""
    try:
        import llama_cpp.mtmd_cpp  # noqa: F401
    # No library: load_shared_library's OSError or RuntimeError; an older one: a missing symbol.
    except (OSError, RuntimeError, AttributeError) as exc:
        return f"llama-cpp-python has no multimodal library (build it with CMAKE_ARGS=-DLLAVA_BUILD=ON): {exc}"
    return None


def projector_bytes(mmproj_path: Path | str) -> int:
    """Bytes of the projector's tensors: what loading it adds to the model's weights.

    Its compute buffer (small next to the weights for common projectors, sized by the
    image resolution) is not counted.
    """
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(mmproj_path)).tensors)


def image_dimensions(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from a PNG, JPEG, GIF or WebP header; None for anything else.

    Read before decoding so that only these formats ever reach llama.cpp's decoders: its
    helper would hand any other bytes to ffmpeg as a possible video.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return "png", w, h
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return "gif", w, h
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        kind = data[12:16]
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", data[26:30])
            return "webp", w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":
            return "webp", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        return None
    if data[:3] == b"\xff\xd8\xff":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte before a marker
                i += 1
                continue
            if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
                i += 2
                continue
            # Start of frame: every SOFn but DHT (C4), JPG (C8) and DAC (CC) carry the size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return "jpeg", w, h
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class _Log:
    """Routes libmtmd's log through llama-cpp-python's (so ``verbose`` governs both) and
    keeps the calling thread's last error: mtmd reports failures only as a log line."""

    installed = False
    last = threading.local()
    _callback: Any = None

    @classmethod
    def install(cls, mtmd: Any) -> None:
        if cls.installed:
            return
        import llama_cpp
        from llama_cpp import _logger

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level == _ERROR_LEVEL:
                cls.last.text = text.decode("utf-8", "replace").strip()
            _logger.llama_log_callback(level, text, user_data)

        cls._callback = callback  # the C side keeps only a pointer: keep the object alive
        mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
        cls.installed = True

    @classmethod
    def take(cls) -> str:
        text = getattr(cls.last, "text", "") or "no reason logged"
        cls.last.text = ""
        return text


class Vision:
    """The projector for a model: serves any ``Llama`` loaded from the same model file as
    ``llm`` (each of a worker's parallel slots), one image encoding at a time."""

    def __init__(self, llm: Any, mmproj_path: Path | str, n_threads: int | None = None,
                 use_gpu: bool = False, max_pixels: int = MAX_PIXELS) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        self._mtmd = mtmd
        _Log.install(mtmd)
        self.path = Path(mmproj_path)
        self.max_pixels = max_pixels
        # The encoder's graph and its output buffer live in the context: slots on other
        # threads must take turns.
        self._lock = threading.Lock()
        params = mtmd.mtmd_context_params_default()
        # Off unless asked: a CPU placement must not quietly take GPU memory the scheduler
        # did not count.
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = n_threads or llm.n_threads
        _Log.take()
        self._ctx = mtmd.mtmd_init_from_file(str(self.path).encode(), llm.model, params)
        if not self._ctx:
            self._ctx = None
            raise ProjectorError(f"cannot use the projector {self.path}: {_Log.take()}")
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise ProjectorError(f"{self.path} has no vision encoder")
        self.media_marker: str = (mtmd.mtmd_get_marker(self._ctx) or mtmd.mtmd_default_marker()).decode()
        # Freed before the model it points into when the Llama closes first.
        llm._stack.callback(self.close)

    def close(self) -> None:
        if self._ctx is not None:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def _bitmap(self, data: bytes, index: int, count: int) -> int:
        which = f"image {index + 1} of {count}" if count > 1 else "the image"
        dims = image_dimensions(data)
        if dims is None:
            raise ImageError(f"{which} is not a PNG, JPEG, WebP or GIF image")
        kind, w, h = dims
        if w == 0 or h == 0:
            raise ImageError(f"{which} has no pixels ({w}x{h})")
        if w * h > self.max_pixels:
            raise ImageError(f"{which} is {w}x{h}, over this server's limit of {self.max_pixels} pixels")
        m = self._mtmd
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        opt = m.mtmd_helper_init_opt_default()
        if kind != "webp":
            # A file stb_image fails on falls through to ffprobe/ffmpeg as a possible video;
            # a directory that cannot hold them stops untrusted bytes there. (WebP itself is
            # decoded only by ffmpeg from PATH, in builds with video support.)
            opt.video_params.ffmpeg_bin_dir = _NO_FFMPEG
        _Log.take()
        got = m.mtmd_helper_bitmap_init_from_buf_wrapper(self._ctx, buf, len(data), False, opt)
        if got.video_ctx:  # decoded as a video after all: not what was asked for
            m.mtmd_helper_video_free(got.video_ctx)
            if got.bitmap:
                m.mtmd_bitmap_free(got.bitmap)
            raise ImageError(f"{which} is not a still {kind.upper()} image")
        if not got.bitmap:
            hint = " (WebP needs ffmpeg on the server's PATH)" if kind == "webp" else ""
            raise ImageError(f"{which} could not be decoded as {kind.upper()}{hint}")
        return got.bitmap

    def eval_prompt(self, llm: Any, prompt_text: str, images: list[bytes], add_special: bool = True) -> Prompt:
        """Evaluate ``prompt_text`` (``media_marker`` where each image goes, in order) into
        ``llm``; then ``llm.create_completion(prompt.tokens, ...)`` generates from its end.

        ``add_special`` lets the tokenizer add the model's BOS, as ``Llama.tokenize``'s
        ``add_bos`` does. ImageError (the request's fault) is raised before the context is touched.
        """
        return self._tokenized(prompt_text, images, add_special, lambda chunks: self._eval_chunks(llm, chunks))

    def count(self, prompt_text: str, images: list[bytes], add_special: bool = True) -> int:
        """The positions ``eval_prompt`` would fill (what ``usage.prompt_tokens`` counts), from
        the images' preprocessing alone: the projector's encoder does not run."""
        m = self._mtmd

        def positions(chunks: Any) -> int:
            return sum(int(m.mtmd_input_chunk_get_n_pos(m.mtmd_input_chunks_get(chunks, i)))
                       for i in range(m.mtmd_input_chunks_size(chunks)))

        return self._tokenized(prompt_text, images, add_special, positions)

    def _tokenized(self, prompt_text: str, images: list[bytes], add_special: bool, use: Callable[[Any], T]) -> T:
        """``use`` applied to the prompt's chunks (text and images, as mtmd splits them)."""
        if self._ctx is None:
            raise RuntimeError("this Vision is closed")
        m = self._mtmd
        markers = prompt_text.count(self.media_marker)
        if markers != len(images):
            raise ImageError(f"the prompt has {markers} image place(s) for {len(images)} image(s)",
                             code="invalid_request")
        bitmaps: list[int] = []
        chunks = m.mtmd_input_chunks_init()
        try:
            for i, data in enumerate(images):
                bitmaps.append(self._bitmap(data, i, len(images)))
            text = m.mtmd_input_text()
            encoded = prompt_text.encode("utf-8")  # kept referenced while the C side reads it
            text.text, text.text_len = encoded, len(encoded)
            text.add_special, text.parse_special = add_special, True
            array = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            with self._lock:
                _Log.take()
                rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), array, len(bitmaps))
            if rc == 1:
                raise ImageError("the prompt's image places do not match its images", code="invalid_request")
            if rc != 0:
                raise ImageError(f"the image could not be prepared for this model: {_Log.take()}")
            return use(chunks)
        finally:
            m.mtmd_input_chunks_free(chunks)
            for b in bitmaps:
                m.mtmd_bitmap_free(b)

    def _eval_chunks(self, llm: Any, chunks: Any) -> Prompt:
        import llama_cpp

        m = self._mtmd
        # Each chunk: (start position, ids standing for its positions, the chunk when it is media).
        spans: list[tuple[int, list[int], Any]] = []
        n_pos = n_media = media_pos = 0
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids, media = [int(ptr[j]) for j in range(n.value)], None
            else:
                # Positions, not embeddings: M-RoPE models give an image fewer positions than
                # tokens, and llama-cpp-python counts n_tokens in positions.
                width = int(m.mtmd_input_chunk_get_n_pos(chunk))
                ids, media = [_stand_in(m.mtmd_input_chunk_get_id(chunk))] * width, chunk
                n_media += 1
                media_pos += width
            if ids:
                spans.append((n_pos, ids, media))
                n_pos += len(ids)
        if not spans or spans[-1][2] is not None:
            # llama.cpp computes no logits for image embeddings, so there would be nothing to
            # sample the first token from (its sampler aborts the process on that).
            raise ImageError("the prompt ends with an image: the model needs text after it to "
                             "start its reply from", code="invalid_request")
        n_ctx = llm.n_ctx()
        cells = max(n_pos, int(m.mtmd_helper_get_n_tokens(chunks)))
        if cells >= n_ctx:  # create_completion needs one free position to generate into
            raise ImageError(
                f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted in "
                f"{cells} tokens ({media_pos} of them for {n_media} image(s)). Please reduce the length "
                f"of the messages or the number of images.", code="context_length_exceeded")
        tokens = [t for _, ids, _ in spans for t in ids]

        keep = self._reusable(llm, spans, tokens)
        if keep == 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llm.reset()
            llm._ctx.kv_cache_clear()
        llm.n_tokens = keep
        for start, ids, media in spans:
            end = start + len(ids)
            if end <= keep:
                continue
            if media is None:
                # Llama.eval writes input_ids and leaves the last token's logits live.
                llm.eval(ids[llm.n_tokens - start:])
                continue
            new_n_past = llama_cpp.llama_pos(0)
            with self._lock:
                _Log.take()
                rc = m.mtmd_helper_eval_chunk_single(
                    self._ctx, llm.ctx, media, llama_cpp.llama_pos(start), llama_cpp.llama_seq_id(0),
                    llm.n_batch, False, ctypes.byref(new_n_past))
                reason = _Log.take() if rc else ""
            if rc != 0:
                llm._ctx.kv_cache_seq_rm(-1, start, -1)
                raise RuntimeError(f"llama.cpp could not evaluate an image (error {rc}): {reason}")
            llm.input_ids[start:end] = ids
            llm.n_tokens = int(new_n_past.value)
            llm._requires_eval = True  # until the text after it is evaluated: images leave no logits
        return Prompt(tokens, n_pos, keep)

    @staticmethod
    def _reusable(llm: Any, spans: list[tuple[int, list[int], Any]], tokens: list[int]) -> int:
        """Positions of the context that already hold this prompt's start, in whole images,
        short of the last token: evaluating that one again gives the logits to sample from."""
        have = llm.input_ids[:llm.n_tokens]
        same = 0
        for a, b in zip(have, tokens):
            if a != b:
                break
            same += 1
        same = min(same, len(tokens) - 1)
        for start, ids, media in spans:
            if same < start + len(ids):  # an image cannot be resumed halfway, text can
                return start if media is not None else same
        return same


def _stand_in(chunk_id: bytes | None) -> int:
    """A negative id for an image's positions: no token has one, the same image gets the same."""
    # Without an id there is nothing to recognise the image by: a random value is never reused.
    digest = hashlib.blake2b(chunk_id, digest_size=8).digest() if chunk_id else os.urandom(8)
    return -1 - int.from_bytes(digest, "little") % ((1 << 31) - 1)
