"""One llama.cpp context serving every sequence of a model: continuous batching and
prefix reuse, on llama-cpp-python's low-level API.

The worker today runs one ``llama_cpp.Llama`` per parallel slot: each slot is a whole
context with KV memory of its own, the slots decode apart (competing for the same
cores instead of sharing one matrix multiply), and nothing steers a conversation back
to the slot that holds it, so a turn often reads the whole conversation again.
:class:`BatchedContext` owns one model and one context with ``n_seq_max = parallel``
(a unified KV cache of ``n_ctx × parallel`` cells, each sequence limited to ``n_ctx``)
and serves all of the model's requests from it, as llama.cpp's server does:

* **A step** is one ``llama_decode``: one token for every generating sequence, then as
  much of the prompts being read as fits in the rest of ``n_batch``. A long prompt is
  read over several steps while the running streams still get a token each step; a
  new request joins at the next step; a finished or cancelled one leaves at once.
* **A slot** (one llama.cpp sequence id) remembers the tokens its KV cells hold, and
  keeps them when its request ends. A new request goes to the free slot that holds
  the longest prefix of its prompt, and only the rest is read; what was reused is
  reported (``Usage.cached_tokens``).
* **A sequence** samples with a sampler chain of its own (logit bias, penalties,
  grammar, top-k, top-p, min-p, temperature, seeded draw, in llama-cpp-python's
  order, so that a request samples as ``Llama.create_completion`` would), and ends on
  an end-of-generation token, one of its stop strings, or its token limit.

Threads: every llama.cpp call on the context happens on the thread that runs
:meth:`BatchedContext.step` (the run loop after :meth:`BatchedContext.start`). Any
thread may call ``submit``, ``cancel``, ``stats`` and ``tokenize``: the first two only
leave a note under a lock, the third reads the snapshot published after each step,
the fourth reads the vocabulary, which nothing changes after load.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import itertools
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

from anyad.backends.llama_cpp.prompt_cache import PromptCache, model_identity, shared_prefix

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
Repack = Literal["auto", "on", "off"]
FlashAttention = Literal["auto", "on", "off"]

# KV cache element types as llama.cpp names them (llama-server's --cache-type-k/-v).
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0
FLASH_ATTENTION = {"auto": -1, "on": 1, "off": 0}  # LLAMA_FLASH_ATTN_TYPE_*


class RequestRejected(ValueError):
    """A request this context cannot take; ``code`` as the worker's error frames name it
    (``context_length_exceeded`` or ``invalid_request``), ``param`` the field at fault."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class ContextSettings:
    """How the model and its one context are loaded."""

    path: str
    # Tokens per sequence (what ``n_ctx`` means for a slot today); the KV cache holds
    # ``n_ctx × parallel`` cells, shared by the sequences.
    n_ctx: int = 2048
    parallel: int = 1
    # Tokens per decode step: the generating sequences' tokens plus prompt chunks.
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None  # None: llama.cpp's default
    n_threads_batch: int | None = None  # None: as n_threads
    n_gpu_layers: int = 0
    main_gpu: int = 0
    # The layers' shares over the visible GPUs (llama.cpp's tensor_split); empty: main_gpu's.
    tensor_split: tuple[float, ...] = ()
    # Whether llama.cpp may repack the weights for the CPU's matrix units; "auto": not
    # where AMX is advertised, whose kernels crash this llama.cpp (see load_options).
    repack: Repack = "auto"
    # One KV buffer for all sequences (a long conversation may use what short ones
    # leave) or one stream per sequence (cheaper attention, nothing shared).
    kv_unified: bool = True
    kv_type: str = "f16"  # one of KV_TYPES; a quantized V cache needs flash attention
    flash_attention: FlashAttention = "auto"
    # A slot holding another conversation is taken for its shared prefix only from
    # this many tokens on: below it, a chat template's opening is all they share.
    min_prefix: int = 16
    # The prompt cache (prompt_cache.py): bytes of saved conversation states kept in RAM,
    # and on disk under this folder (None or 0 bytes: no disk tier).
    prompt_cache_bytes: int = 0
    prompt_cache_dir: str | None = None
    prompt_cache_disk_bytes: int = 0
    verbose: bool = False


@dataclass(frozen=True)
class GenerationParams:
    """One request's sampling and limits. Defaults are ``Llama.create_completion``'s,
    so that the worker passes only what a request sets, as it does today."""

    temperature: float = 0.8  # 0: greedy; below 0: a plain draw from the distribution
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64  # Llama's last_n_tokens_size
    seed: int | None = None  # None: a random one
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    # GBNF text, as the worker builds it for response_format and forced tool calls
    # (``LlamaGrammar.from_json_schema(...)._grammar``, ``forced_call_grammar(...)``).
    grammar: str | None = None
    grammar_root: str = "root"
    max_tokens: int | None = None  # None or <= 0: up to the end of the sequence's context
    stop: Sequence[str] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # of the prompt, found in the slot's KV cells and not read again
    completion_tokens: int  # sampled, the end-of-generation token aside

    @property
    def prompt_read(self) -> int:
        """Prompt tokens this request decoded."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Delta:
    """Text for the client. ``tokens``: those sampled since the previous Delta (text
    held back because it may begin a stop string goes out with a later one)."""

    handle: int
    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Done:
    """The last event of a request, exactly one per request."""

    handle: int
    reason: FinishReason
    usage: Usage
    tokens: tuple[int, ...]  # every token sampled, the end-of-generation one aside
    error: str | None = None


Event = Union[Delta, Done]
EventSink = Callable[[Event], None]
# Called on the stepping thread with the row of logits a token was sampled from (a view
# into llama.cpp's buffer, valid until the next step: copy what is kept) and the token.
LogitsObserver = Callable[[np.ndarray, int], None]


@dataclass(frozen=True)
class SlotStats:
    seq_id: int
    busy: bool
    cached_tokens: int  # tokens in this slot's KV cells
    handle: int | None


@dataclass(frozen=True)
class ContextStats:
    parallel: int
    n_ctx: int  # per sequence
    active: int  # requests in a slot
    waiting: int  # requests waiting for a free slot
    slots: tuple[SlotStats, ...]
    steps: int
    tokens_decoded: int  # every token decoded: prompts' and sampled ones
    prompt_tokens_read: int
    prompt_tokens_reused: int
    tokens_generated: int
    # The prompt cache's entries, bytes, hits and misses per tier (empty without one).
    prompt_cache: Mapping[str, int] = field(default_factory=dict)


class Handle:
    """One submitted request. Unless ``submit`` was given a sink of its own, its events
    arrive on ``events`` in order; the last one is a :class:`Done`."""

    def __init__(self, hid: int, prompt_tokens: int) -> None:
        self.id = hid
        self.prompt_tokens = prompt_tokens
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def __iter__(self) -> Iterator[Event]:
        """The events as they come (blocking), the Done last."""
        while True:
            ev = self.events.get()
            yield ev
            if isinstance(ev, Done):
                return

    def __repr__(self) -> str:
        return f"Handle({self.id})"


@dataclass(eq=False)
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # what this sequence's KV cells hold, in order
    last_used: int = 0
    conversation: str | None = None  # the client's conversation id of the last request here
    seq: _Sequence | None = None


@dataclass(eq=False)
class _Sequence:
    handle: Handle
    prompt: list[int]
    params: GenerationParams
    chain: Any  # llama_sampler_p: this request's sampler chain, freed when it ends
    sink: EventSink
    on_logits: LogitsObserver | None
    limit: int  # tokens it may sample
    conversation: str | None = None
    slot: _Slot | None = None
    reused: int = 0
    pending: int | None = None  # sampled, to be decoded next step
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    held: str = ""  # decoded text not sent yet: it may begin a stop string
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    i_batch: int = -1  # its row of logits in this step's batch, -1: none


class BatchedContext:
    """A model loaded once, one llama.cpp context, every request of that model in it."""

    def __init__(self, settings: ContextSettings) -> None:
        from llama_cpp import llama_cpp as lc
        from llama_cpp._logger import set_verbose  # how Llama itself quiets llama.cpp's log

        from anyad.backends.llama_cpp import load_options

        if settings.parallel < 1 or settings.n_ctx < 2 or settings.n_batch < 1:
            raise ValueError("parallel >= 1, n_ctx >= 2 and n_batch >= 1")
        if settings.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type: one of {', '.join(KV_TYPES)}")
        if settings.kv_type != "f16" and settings.flash_attention == "off":
            raise ValueError("a quantized KV cache needs flash attention")
        self._lc = lc
        self.settings = settings
        set_verbose(settings.verbose)
        lc.llama_backend_init()

        self._model: Any = None
        self._ctx: Any = None
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = settings.n_gpu_layers
        mp.main_gpu = settings.main_gpu
        if settings.tensor_split:
            # llama.cpp reads one float per device it may use; kept alive with the context.
            self._split = (ctypes.c_float * lc.LLAMA_MAX_DEVICES)(*settings.tensor_split)
            mp.tensor_split = ctypes.cast(self._split, ctypes.POINTER(ctypes.c_float))
        # llama-server's --no-repack (see load_options.without_repacking for why).
        mp.use_extra_bufts = settings.repack == "on" or (settings.repack == "auto"
                                                         and not load_options.advertises_amx())
        self.repacked = bool(mp.use_extra_bufts)
        self._model = lc.llama_model_load_from_file(settings.path.encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {settings.path}")
        self.vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

        if settings.kv_type != "f16":
            self._check_kv_type(settings.kv_type)

        cp = lc.llama_context_default_params()
        cp.n_ctx = settings.n_ctx * settings.parallel
        # Every generating sequence has a token in every step, whatever n_batch says.
        self._cap = max(settings.n_batch, settings.parallel)
        cp.n_batch = self._cap
        cp.n_ubatch = max(1, min(settings.n_ubatch, self._cap))
        cp.n_seq_max = settings.parallel
        cp.kv_unified = settings.kv_unified
        if settings.n_threads is not None:
            cp.n_threads = settings.n_threads
            cp.n_threads_batch = settings.n_threads
        if settings.n_threads_batch is not None:
            cp.n_threads_batch = settings.n_threads_batch
        cp.flash_attn_type = FLASH_ATTENTION[settings.flash_attention]
        cp.type_k = cp.type_v = KV_TYPES[settings.kv_type]
        cp.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:  # llama.cpp logs why (memory, a KV type the model's heads cannot take)
            self._ctx = None
            lc.llama_model_free(self._model)
            raise RuntimeError("llama.cpp could not create the context")
        self._mem = lc.llama_get_memory(self._ctx)
        # llama.cpp pads the context; each sequence keeps to the n_ctx it was asked for.
        self.n_ctx = min(settings.n_ctx, lc.llama_n_ctx_seq(self._ctx))

        # The batch lives in numpy arrays that llama_batch points into: a step fills them
        # with slice assignments rather than one ctypes call per token and field.
        cap = self._cap
        self._tok = np.zeros(cap, np.int32)
        self._pos = np.zeros(cap, np.int32)
        self._n_seq_id = np.ones(cap, np.int32)
        self._seq_ids = np.zeros(cap, np.int32)
        self._want = np.zeros(cap, np.int8)
        seq_p = ctypes.POINTER(lc.llama_seq_id)
        base = self._seq_ids.ctypes.data
        self._seq_ptrs = (seq_p * cap)(*[ctypes.cast(base + 4 * i, seq_p) for i in range(cap)])
        b: Any = lc.llama_batch()  # its fields are typed as arrays; they take the pointers llama.cpp reads
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        b.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_p))
        b.logits = self._want.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b

        self._cache: PromptCache | None = None
        if settings.prompt_cache_bytes or (settings.prompt_cache_dir and settings.prompt_cache_disk_bytes):
            import llama_cpp

            try:
                identity = model_identity(settings.path, settings.kv_type, llama_cpp.__version__,
                                          settings.flash_attention)
                self._cache = PromptCache(settings.prompt_cache_bytes, identity,
                                          Path(settings.prompt_cache_dir) if settings.prompt_cache_dir else None,
                                          settings.prompt_cache_disk_bytes)
            except Exception:  # the model serves without a cache rather than not at all
                log.exception("batched context: no prompt cache for %s", settings.path)
                self._cache = None

        self._pieces: dict[int, bytes] = {}
        self._slots = [_Slot(i) for i in range(settings.parallel)]
        self._waiting: deque[_Sequence] = deque()
        self._clock = itertools.count(1)  # orders slot use, for least-recently-used
        self._ids = itertools.count(1)
        # What other threads leave for the stepping one.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Sequence] = []
        self._cancels: set[int] = set()
        self._stopping = False
        self._closed = False
        self._step_lock = threading.Lock()  # one stepping thread at a time
        self._thread: threading.Thread | None = None
        self._steps = self._decoded = self._read = self._reused = self._generated = 0
        self._publish()

    def _check_kv_type(self, kv_type: str) -> None:
        """A quantized KV cache stores a head's values in blocks of 32: llama.cpp refuses it
        for narrower heads, with only a log line to say why."""
        meta = self.metadata()
        arch = meta.get("general.architecture", "")
        n_head = int(meta.get(f"{arch}.attention.head_count", "1") or 1)
        n_embd = int(meta.get(f"{arch}.embedding_length", "0") or 0)
        widths = {int(meta.get(f"{arch}.attention.{k}_length", "0") or 0) or n_embd // max(n_head, 1)
                  for k in ("key", "value")}
        if any(w % 32 for w in widths):
            lc = self._lc
            lc.llama_model_free(self._model)
            self._model = None
            raise RuntimeError(f"kv_cache_type {kv_type!r} needs attention heads a multiple of 32 wide; this "
                               f"model's are {min(widths)}: use kv_cache_type = \"f16\"")

    # ---- the vocabulary (any thread) ----

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8") if isinstance(text, str) else text
        n = len(data) + 8
        buf = (lc.llama_token * n)()
        got = lc.llama_tokenize(self.vocab, data, len(data), buf, n, add_special, parse_special)
        if got < 0:  # -got: the room it needs
            n = -got
            buf = (lc.llama_token * n)()
            got = lc.llama_tokenize(self.vocab, data, len(data), buf, n, add_special, parse_special)
        return list(buf[:got])

    def piece(self, token: int) -> bytes:
        """A token's bytes as generated text carries them (control tokens as nothing, as
        ``Llama.create_completion`` writes them)."""
        got = self._pieces.get(token)
        if got is None:
            lc = self._lc
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            got = self._pieces[token] = buf.raw[:max(n, 0)]
        return got

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def metadata(self) -> dict[str, str]:
        """The model file's key/value metadata, as ``Llama.metadata`` has it (the chat
        template among it). ``self.vocab`` serves the llama_vocab_* calls (BOS, EOS, FIM
        tokens) the worker makes on a ``Llama``'s ``_model.vocab`` today."""
        lc = self._lc
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1024)

        def read(fn: Callable[..., int], i: int) -> str:
            nonlocal buf
            n = fn(self._model, i, buf, len(buf))
            if n >= len(buf):  # the length it needs, without the terminating zero
                buf = ctypes.create_string_buffer(n + 1)
                n = fn(self._model, i, buf, len(buf))
            return buf.value.decode("utf-8", errors="replace")

        for i in range(lc.llama_model_meta_count(self._model)):
            out[read(lc.llama_model_meta_key_by_index, i)] = read(lc.llama_model_meta_val_str_by_index, i)
        return out

    @property
    def prompt_cache(self) -> PromptCache | None:
        return self._cache

    # ---- requests (any thread) ----

    def submit(self, tokens: Sequence[int], params: GenerationParams | None = None, *,
               on_event: EventSink | None = None, on_logits: LogitsObserver | None = None,
               conversation: str | None = None) -> Handle:
        """Queue a request; it joins the batch at the next step. Its events go to
        ``on_event`` (called on the stepping thread: it must not block, and must not
        call back into ``step``) or, without one, to the handle's queue. ``conversation``: the
        client's id for the conversation (a hint: its slot is preferred even where the prompt
        has changed more than a next turn does). Raises
        :class:`RequestRejected` for a prompt or parameters this context cannot take."""
        params = params or GenerationParams()
        prompt = [int(t) for t in tokens]
        if not prompt:
            raise RequestRejected("invalid_request", "the prompt has no tokens", "prompt")
        if any(not 0 <= t < self.n_vocab for t in prompt):
            raise RequestRejected("invalid_request", f"the prompt holds a token id outside 0..{self.n_vocab - 1}",
                                  "prompt")
        if len(prompt) >= self.n_ctx:
            raise RequestRejected("context_length_exceeded",
                                  f"This model's maximum context length is {self.n_ctx} tokens. However, your "
                                  f"prompt resulted in {len(prompt)} tokens.", "messages")
        room = self.n_ctx - len(prompt)  # as Llama: a reply may fill the rest of the context
        limit = room if params.max_tokens is None or params.max_tokens <= 0 else min(params.max_tokens, room)
        chain = self._chain(params)  # reads the vocabulary only: safe beside a running step
        with self._lock:
            if self._closed or self._stopping:
                self._lc.llama_sampler_free(chain)
                raise RuntimeError("this context is closed")
            handle = Handle(next(self._ids), len(prompt))
            seq = _Sequence(handle, prompt, params, chain, on_event or handle.events.put, on_logits, limit,
                            conversation=conversation)
            self._inbox.append(seq)
            self._wake.notify()
        return handle

    def cancel(self, handle: Handle | int) -> None:
        """Stop a request at the next step (within a token); its slot is free from then
        on, its Done says ``cancelled``. A request that already ended is left alone."""
        with self._lock:
            self._cancels.add(handle if isinstance(handle, int) else handle.id)
            self._wake.notify()

    def stats(self) -> ContextStats:
        """As of the last step (it never waits for one to end)."""
        snap = self._snapshot
        with self._lock:
            inbox = len(self._inbox)
        return dataclasses.replace(snap, waiting=snap.waiting + inbox)

    # ---- the run loop ----

    def start(self) -> None:
        """Step on a thread of its own whenever there is work (then nobody else may step)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="batched-context", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancels or self._busy()):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug here must not leave clients waiting forever
                log.exception("batched context: step failed")
                self._fail_all(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """End every request (``cancelled``), stop the loop, free the context and model.
        Not from an event sink or logits observer: those run inside a step."""
        with self._wake:
            if self._closed:
                return
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._step_lock:
            with self._lock:
                self._closed = True
                inbox, self._inbox = self._inbox, []
            lc = self._lc
            if self._ctx is not None:
                for seq in [*inbox, *self._waiting, *(s.seq for s in self._slots if s.seq is not None)]:
                    self._finish(seq, "cancelled")
                self._waiting.clear()
                if self._cache is not None:  # every conversation the slots hold, kept for the next load
                    try:
                        for slot in self._slots:
                            if len(slot.cached) >= self.settings.min_prefix:
                                self._save(slot)
                        self._cache.flush()
                    except Exception:
                        log.exception("batched context: the prompt cache could not be saved")
                lc.llama_free(self._ctx)
                self._ctx = None
            if self._model is not None:
                lc.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> BatchedContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- one step (the stepping thread) ----

    def step(self) -> bool:
        """One decode for every active sequence; False when there was nothing to do."""
        with self._step_lock:
            if self._ctx is None:
                return False
            self._take_notes()
            self._admit()
            active = [s.seq for s in self._slots if s.seq is not None]
            if not active:
                self._publish()
                return False
            n = self._fill_batch(active)
            self._batch.n_tokens = n
            rc = self._lc.llama_decode(self._ctx, self._batch)
            if rc != 0:
                self._decode_failed(active, rc)
                self._publish()
                return True
            self._steps += 1
            self._decoded += n
            for seq in active:
                if seq.i_batch >= 0:
                    self._sample(seq)
            self._publish()
            return True

    def _busy(self) -> bool:
        return bool(self._waiting) or any(s.seq is not None for s in self._slots)

    def _take_notes(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self._waiting.extend(inbox)
        if not cancels:
            return
        for seq in [s for s in self._waiting if s.handle.id in cancels]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for slot in self._slots:
            if slot.seq is not None and slot.seq.handle.id in cancels:
                self._finish(slot.seq, "cancelled")

    def _admit(self) -> None:
        """Waiting requests, oldest first, into free slots."""
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            seq = self._waiting.popleft()
            slot, shared = self._choose(free, seq.prompt, seq.conversation)
            min_prefix = self.settings.min_prefix
            hit = self._cache.best(seq.prompt, shared + min_prefix) if self._cache is not None else None
            if hit is not None:
                if len(slot.cached) >= min_prefix:
                    self._save(slot)  # the conversation this slot held, before it is replaced
                restored = self._restore(slot, hit[0])
                if restored is not None:  # loaded, or the slot was emptied trying
                    shared = hit[1] if restored else 0
            elif self._cache is not None and len(slot.cached) - min(shared, len(seq.prompt) - 1) >= min_prefix:
                self._save(slot)  # the conversation this slot held, before its tail is cut
            # The last prompt token is always decoded again: its logits are the first draw's.
            keep = min(shared, len(seq.prompt) - 1)
            if keep < len(slot.cached):
                if not self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                    # A memory that cannot cut a sequence's tail (a recurrent model's) starts over.
                    self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                    keep = 0
                del slot.cached[keep:]
            seq.slot, seq.reused = slot, keep
            slot.seq = seq
            slot.conversation = seq.conversation
            slot.last_used = next(self._clock)
            self._reused += keep

    def _save(self, slot: _Slot) -> None:
        """The slot's conversation into the prompt cache."""
        assert self._cache is not None
        lc = self._lc
        n = lc.llama_state_seq_get_size(self._ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * n)()
        got = lc.llama_state_seq_get_data(self._ctx, buf, n, slot.seq_id)
        if got:
            self._cache.put(slot.cached, ctypes.string_at(buf, got))

    def _restore(self, slot: _Slot, entry: Any) -> bool | None:
        """A saved conversation into the slot, in place of what it held: True; False when
        llama.cpp refused it (the slot is empty then); None when the state could not be read
        (the slot is as it was). A refused or unreadable state is forgotten."""
        assert self._cache is not None
        data = self._cache.load(entry)
        if data is None:
            return None
        lc = self._lc
        lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cached.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        del data
        if not lc.llama_state_seq_set_data(self._ctx, buf, len(buf), slot.seq_id):
            log.warning("batched context: a saved state did not load; reading the prompt instead")
            lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            self._cache.refused(entry)
            return False
        self._cache.served(entry)
        slot.cached.extend(entry.tokens)
        return True

    def _choose(self, free: list[_Slot], prompt: list[int], conversation: str | None = None) -> tuple[_Slot, int]:
        """The slot for a prompt, and how many of its cached tokens the prompt shares:
        the one whose cache the prompt continues (the next turn of its conversation), or
        that last served the same conversation id; else an empty one, so that no other
        conversation is lost; else the one sharing the longest prefix; else the least
        recently used."""
        scored = [(shared_prefix(s.cached, prompt), s) for s in free]
        best, slot = max(scored, key=lambda x: (x[0], -x[1].last_used))
        if best >= self.settings.min_prefix and 2 * best >= len(slot.cached):
            return slot, best
        if conversation is not None:
            for n, s in scored:
                if s.conversation == conversation and n >= self.settings.min_prefix:
                    return s, n
        empty = [s for s in free if not s.cached]
        if empty:
            return empty[0], 0
        if best >= self.settings.min_prefix:
            return slot, best
        slot = min(free, key=lambda s: s.last_used)
        return slot, shared_prefix(slot.cached, prompt)

    def _fill_batch(self, active: list[_Sequence]) -> int:
        """This step's tokens: the generating sequences' first, then prompt chunks in the
        order the requests came, while n_batch has room."""
        n = 0
        reading = []
        for seq in active:
            seq.i_batch = -1
            if seq.pending is not None:
                slot = seq.slot
                assert slot is not None
                self._put(n, seq.pending, len(slot.cached), slot.seq_id, True)
                seq.i_batch = n
                slot.cached.append(seq.pending)
                seq.pending = None
                n += 1
            else:
                reading.append(seq)
        for seq in sorted(reading, key=lambda s: s.handle.id):
            room = self._cap - n
            if room <= 0:
                break
            slot = seq.slot
            assert slot is not None
            start = len(slot.cached)
            chunk = seq.prompt[start:start + room]
            k = len(chunk)
            self._tok[n:n + k] = chunk
            self._pos[n:n + k] = np.arange(start, start + k, dtype=np.int32)
            self._seq_ids[n:n + k] = slot.seq_id
            self._want[n:n + k] = 0
            if start + k == len(seq.prompt):  # the prompt's last token: the first draw's logits
                self._want[n + k - 1] = 1
                seq.i_batch = n + k - 1
            slot.cached.extend(chunk)
            self._read += k
            n += k
        return n

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        self._tok[i] = token
        self._pos[i] = pos
        self._seq_ids[i] = seq_id
        self._want[i] = logits

    def _decode_failed(self, active: list[_Sequence], rc: int) -> None:
        # 1: no room in the KV cache (the sizing above should rule it out); 2: aborted;
        # below 0: an error, after which part of the batch may be in the cache. The
        # sequences in this batch end, and their slots forget what they held.
        msg = f"llama_decode returned {rc}"
        log.error("batched context: %s", msg)
        for seq in active:
            slot = seq.slot
            assert slot is not None
            self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.cached.clear()
            self._finish(seq, "error", msg)

    def _sample(self, seq: _Sequence) -> None:
        lc = self._lc
        token = lc.llama_sampler_sample(seq.chain, self._ctx, seq.i_batch)  # draws and accepts it
        if seq.on_logits is not None:
            row = lc.llama_get_logits_ith(self._ctx, seq.i_batch)
            try:
                seq.on_logits(np.ctypeslib.as_array(row, shape=(self.n_vocab,)), token)
            except Exception:
                log.exception("batched context: logits observer failed; cancelling %s", seq.handle)
                self._finish(seq, "error", "the logits observer failed")
                return
        if self.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated.append(token)
        seq.unsent.append(token)
        self._generated += 1
        text = seq.held + seq.decoder.decode(self.piece(token))
        cut = _first_stop(text, seq.params.stop)
        if cut is not None:
            seq.held = text[:cut]
            self._finish(seq, "stop", stopped=True)
            return
        hold = _stop_prefix(text, seq.params.stop)
        send, seq.held = text[:len(text) - hold], text[len(text) - hold:]
        if send:
            self._emit(seq, Delta(seq.handle.id, send, tuple(seq.unsent)))
            seq.unsent = []
        if len(seq.generated) >= seq.limit:
            self._finish(seq, "length")
        else:
            seq.pending = token

    def _emit(self, seq: _Sequence, ev: Event) -> None:
        try:
            seq.sink(ev)
        except Exception:
            # A sink that fails (a closed pipe) must not stop the other sequences.
            log.exception("batched context: event sink failed; cancelling %s", seq.handle)
            with self._lock:
                self._cancels.add(seq.handle.id)

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None,
                stopped: bool = False) -> None:
        """End a request: what text it still holds (unless cancelled), then its Done; its
        slot is free at once and keeps its KV cells for the next prompt that shares them."""
        if reason in ("stop", "length"):
            tail = seq.held if stopped else seq.held + seq.decoder.decode(b"", final=True)
            if tail:
                self._emit(seq, Delta(seq.handle.id, tail, tuple(seq.unsent)))
                seq.unsent = []
        seq.held = ""
        if seq.chain is not None:
            self._lc.llama_sampler_free(seq.chain)
            seq.chain = None
        slot = seq.slot
        if slot is not None:
            slot.seq = None
            slot.last_used = next(self._clock)
            seq.slot = None
        seq.pending = None
        usage = Usage(len(seq.prompt), seq.reused, len(seq.generated))
        self._emit(seq, Done(seq.handle.id, reason, usage, tuple(seq.generated), error))

    def _fail_all(self, message: str) -> None:
        with self._step_lock:
            for seq in [*self._waiting, *(s.seq for s in self._slots if s.seq is not None)]:
                if seq.slot is not None:
                    self._lc.llama_memory_seq_rm(self._mem, seq.slot.seq_id, -1, -1)
                    seq.slot.cached.clear()
                self._finish(seq, "error", message)
            self._waiting.clear()

    def _publish(self) -> None:
        slots = tuple(SlotStats(s.seq_id, s.seq is not None, len(s.cached),
                                s.seq.handle.id if s.seq is not None else None) for s in self._slots)
        self._snapshot = ContextStats(
            parallel=len(self._slots), n_ctx=self.n_ctx, active=sum(s.busy for s in slots),
            waiting=len(self._waiting), slots=slots, steps=self._steps, tokens_decoded=self._decoded,
            prompt_tokens_read=self._read, prompt_tokens_reused=self._reused, tokens_generated=self._generated,
            prompt_cache=self._cache.stats() if self._cache is not None else {})

    # ---- sampler chains ----

    def _chain(self, p: GenerationParams) -> Any:
        """The request's sampler chain, in ``Llama._init_sampler``'s order: logit bias
        (llama-cpp-python applies it first, as a logits processor), penalties over the
        sampled tokens, grammar, then greedy, or top-k, top-p, min-p, temperature and a
        seeded draw."""
        lc = self._lc
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(p, name)):
                raise RequestRejected("invalid_request", f"{name}: must be a finite number", name)
        if p.repeat_penalty <= 0:
            raise RequestRejected("invalid_request", "repeat_penalty: must be above 0", "repeat_penalty")
        bias = {}
        for tid, value in p.logit_bias.items():
            if not (isinstance(tid, int) and 0 <= tid < self.n_vocab):
                raise RequestRejected("invalid_request", f"logit_bias: {tid!r} is not a token id of this model "
                                      f"(its vocabulary has {self.n_vocab} tokens)", "logit_bias")
            bias[tid] = float(value)
        cp = lc.llama_sampler_chain_default_params()
        cp.no_perf = True
        chain = lc.llama_sampler_chain_init(cp)
        try:
            if bias:
                arr = (lc.llama_logit_bias * len(bias))()
                for i, (tid, value) in enumerate(bias.items()):
                    arr[i].token, arr[i].bias = tid, value
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
                self.n_vocab, p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty))
            if p.grammar:
                g = lc.llama_sampler_init_grammar(self.vocab, p.grammar.encode("utf-8"),
                                                  p.grammar_root.encode("utf-8"))
                if not g:  # llama.cpp logs the parse error; it returns no sampler
                    raise RequestRejected("invalid_request", "grammar: llama.cpp cannot parse it", "grammar")
                lc.llama_sampler_chain_add(chain, g)
            seed = lc.LLAMA_DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            if p.temperature < 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
            elif p.temperature == 0:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            else:
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(p.top_k))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(p.top_p, 1))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(p.min_p, 1))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(p.temperature))
                lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        except BaseException:
            lc.llama_sampler_free(chain)
            raise
        return chain


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop string: held back,
    since the next token may complete it."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
