"""The llama.cpp worker process: one loaded GGUF model, driven over stdin/stdout.

Run as ``python -m anyad.backends.llama_cpp.worker`` by the daemon (see
``anyad.workers``). It reads a ``load`` frame, loads the model, then serves
``chat`` operations one at a time, streaming a ``delta`` frame per piece of
text. A reader thread watches stdin so that a ``cancel`` stops generation
between two tokens, and so that the worker exits at once when the daemon's end
of the pipe closes (the daemon died): a worker never outlives its daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import IO, TYPE_CHECKING, Any, Callable, TypeVar, cast

from anyad import protocol
from anyad.backends.llama_cpp import load_options
from anyad.backends.llama_cpp.batched import (
    KV_TYPES,
    BatchedContext,
    ContextSettings,
    Delta,
    GenerationParams,
    Handle,
    RequestRejected,
)
from anyad.backends.llama_cpp.batched import Event as BatchedEvent
from anyad.backends.llama_cpp.logprobs import TokenLogprobs, piece_reader
from anyad.errors import InvalidRequest
from anyad.toolcalls import Event, Family, ReplyParser, family_of, forced_call_grammar, opens_reasoning

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

T = TypeVar("T")

# ChatML, for a model file that carries no chat template of its own.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _template_call(call: dict[str, Any], ids: "dict[str, str] | None") -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            fn["arguments"] = parsed
    out = {k: v for k, v in call.items() if v is not None and k != "index"}
    out["function"] = fn
    if ids is not None and "id" in out:
        out["id"] = _short_id(out["id"], ids)
    return out


def _short_id(call_id: Any, ids: dict[str, str]) -> str:
    # Mistral's templates refuse any id but 9 letters or digits; a client's ids (OpenAI's
    # "call_…", another provider's) map to stable ones of that shape.
    key = str(call_id)
    if key not in ids:
        ids[key] = key if len(key) == 9 and key.isascii() and key.isalnum() else \
            hashlib.sha256(key.encode()).hexdigest()[:9]
    return ids[key]


def template_messages(messages: list[dict[str, Any]], family: Family) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: no null fields (templates test ``is defined``),
    tool-call arguments as objects (most templates write them with ``tojson``), a tool result
    without a ``tool_call_id`` (Ollama sends none) given that of the call it answers, in
    order, and for Mistral's templates, tool-call ids of the one shape they accept."""
    ids: dict[str, str] | None = {} if family.name == "mistral" else None
    unanswered: list[str] = []
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["tool_calls"] = [_template_call(tc, ids) for tc in m["tool_calls"] if isinstance(tc, dict)]
            unanswered = [str(tc["id"]) for tc in m["tool_calls"] if "id" in tc]
        if m.get("role") == "tool":
            if "tool_call_id" not in m and unanswered:
                m["tool_call_id"] = unanswered[0]
            elif ids is not None and "tool_call_id" in m:
                m["tool_call_id"] = _short_id(m["tool_call_id"], ids)
            if m.get("tool_call_id") in unanswered:
                unanswered.remove(m["tool_call_id"])
        out.append(m)
    return out


def delta_frames(rid: int, events: list[Event]) -> list[dict[str, Any]]:
    """The parser's events as delta frames; empty ones left out."""
    frames = []
    for ev in events:
        frame: dict[str, Any] = {"t": "delta", "id": rid}
        if ev.text:
            frame["text"] = ev.text
        if ev.reasoning:
            frame["reasoning"] = ev.reasoning
        if ev.tool_calls:
            frame["tool_calls"] = ev.tool_calls
        if len(frame) > 2:
            frames.append(frame)
    return frames


def _tool_mode(params: dict[str, Any]) -> tuple[bool, bool]:
    """(tools offered to the template, a call forced by the grammar) for a chat's params."""
    choice = params.get("tool_choice")
    offered = bool(params.get("tools")) and choice != "none"
    return offered, offered and (choice == "required" or isinstance(choice, dict))


class RequestError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class Engine:
    def __init__(self, load: dict[str, Any]) -> None:
        import llama_cpp
        import numpy as np
        from llama_cpp import llama_chat_format

        self.llama_cpp = llama_cpp

        class CountingLlama(llama_cpp.Llama):
            """Counts sampled tokens: llama-cpp-python reports no usage when streaming."""

            sampled = 0
            sampled_total = 0
            last_token = -1
            # Set for a request that asks for log probabilities (see logprobs.py).
            logprobs: TokenLogprobs | None = None
            # Set for a request that asks for its tokens back (Ollama's context): each sampled one.
            record: list[int] | None = None

            def generate(self, *args: Any, **kwargs: Any):
                for token in super().generate(*args, **kwargs):
                    self.sampled += 1
                    self.sampled_total += 1
                    self.last_token = token
                    if self.record is not None:
                        self.record.append(token)
                    if self.logprobs is not None and not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                        # The row the sampler just drew from; the next eval overwrites it.
                        row = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
                        self.logprobs.add(np.ctypeslib.as_array(row, shape=(self._n_vocab,)), token)
                    yield token

        if load.get("n_gpu_layers", 0) and not llama_cpp.llama_supports_gpu_offload():
            # llama.cpp would quietly run on the CPU; the scheduler must know, to place it honestly.
            raise RuntimeError("this llama-cpp-python build cannot offload layers to a GPU")
        t0 = time.monotonic()
        self.load = load
        repack = load.get("repack") or "auto"
        self.repacked = repack == "on" or (repack == "auto" and not load_options.advertises_amx())
        self.kind = engine_kind(load)
        self.ctx: BatchedContext | None = None
        # Requests in the batched context, by the daemon's request id (for cancel).
        self._handles: dict[int, Handle] = {}
        self._handles_lock = threading.Lock()
        self._eog: list[int] | None = None
        if self.kind == "batched":
            # One context for every sequence of the model (see batched.py).
            self.ctx = BatchedContext(context_settings(load))
            self.llms: list[Any] = [ContextView(self.ctx) for _ in range(self.ctx.settings.parallel)]
            self.vocab = self.ctx.vocab
            self.metadata = self.ctx.metadata()
            self.repacked = self.ctx.repacked
            self.ctx.start()
        else:
            # One context per parallel slot. On the CPU they share the memory-mapped weights.
            with self._loading():
                self.llms = self._open(CountingLlama, load)
            self.vocab = self.llms[0]._model.vocab
            self.metadata = self.llms[0].metadata
        self.llm = self.llms[0]
        self.load_s = time.monotonic() - t0
        eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self.bos_id = bos_id = llama_cpp.llama_vocab_bos(self.vocab)
        template = self.metadata.get("tokenizer.chat_template")
        self.template_source = "model" if template else "fallback-chatml"
        override = load.get("tool_format") or "auto"
        self.family = family_of(template, None if override == "auto" else override)
        self.reasoning_setting = load.get("reasoning") or "auto"
        if self.reasoning_setting == "on" and self.family.reasoning is None:
            self.family = dataclasses.replace(self.family, reasoning=("<think>", "</think>"))
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template or FALLBACK_TEMPLATE,
            eos_token=self._token_text(eos_id) if eos_id != -1 else "",
            bos_token=self._token_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id] if eos_id != -1 else None,
        )
        # One projector for every slot (it takes one image encoding at a time).
        self.vision = None
        if load.get("mmproj"):
            from anyad.backends.llama_cpp.vision import Vision

            self.vision = Vision(self.llm, load["mmproj"], n_threads=load["n_threads"],
                                 use_gpu=bool(load.get("n_gpu_layers")))
        self.warm_up_s = 0.0
        if load.get("warm_up"):
            self._warm_up()

        self.load = load
        self._embedder: llama_cpp.Llama | None = None
        self._embed_lock = threading.Lock()

    def eog_tokens(self) -> list[int]:
        """The vocabulary's end-of-generation tokens (read once: it takes a pass over the vocabulary)."""
        if self._eog is None:
            lc = self.llama_cpp
            self._eog = [t for t in range(lc.llama_vocab_n_tokens(self.vocab)) if lc.llama_vocab_is_eog(self.vocab, t)]
        return self._eog

    def _token_text(self, token: int) -> str:
        return self.llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="ignore")

    def _warm_up(self) -> None:
        """One short generation per context, so the first request does not pay for
        first-touch page faults and graph allocation."""
        t0 = time.monotonic()
        fmt = self.formatter(messages=[{"role": "user", "content": "Hi"}])
        prompt = self.llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)
        if self.ctx is not None:
            for _ in self.ctx.submit(prompt, GenerationParams(temperature=0.0, max_tokens=1)):
                pass
        else:
            for llm in self.llms:
                llm.create_completion(prompt, max_tokens=1, temperature=0.0)
        self.warm_up_s = time.monotonic() - t0

    @property
    def tokens_generated(self) -> int:
        if self.ctx is not None:
            return self.ctx.stats().tokens_generated
        return sum(llm.sampled_total for llm in self.llms)

    def stats(self) -> dict[str, Any]:
        """What a ``stats`` frame adds to busy/active: the engine's counters."""
        out: dict[str, Any] = {"tokens_generated": self.tokens_generated}
        if self.ctx is not None:
            st = self.ctx.stats()
            out.update(waiting=st.waiting, steps=st.steps, tokens_decoded=st.tokens_decoded,
                       prompt_tokens_read=st.prompt_tokens_read,
                       prompt_tokens_reused=st.prompt_tokens_reused, prompt_cache=dict(st.prompt_cache),
                       slots_cached_tokens=[s.cached_tokens for s in st.slots])
        return out

    def close(self) -> None:
        """At a normal stop: the batched context saves its slots' conversations to the prompt
        cache's disk tier (for the next load), then frees its memory."""
        if self.ctx is not None:
            self.ctx.close()

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` within a token (the caller has put it in ``cancelled``)."""
        if self.ctx is not None:
            with self._handles_lock:
                handle = self._handles.get(rid)
            if handle is not None:
                self.ctx.cancel(handle)

    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length vectors, one per input, from a second context in embedding mode.

        It shares the memory-mapped weights with the generating one, so only its own
        context costs memory; it is made on the first embedding request.
        """
        with self._embed_lock:  # one embedding context, shared by the slots
            return self._embed(inputs)

    def _embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        llama_cpp = self.llama_cpp
        if self._embedder is None:
            arch = self.metadata.get("general.architecture", "")
            # Models that declare their pooling (embedding models) keep it; decoders get mean pooling.
            pooling = (llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if f"{arch}.pooling_type" in self.metadata
                       else llama_cpp.LLAMA_POOLING_TYPE_MEAN)
            with self._loading():
                self._embedder = llama_cpp.Llama(
                    model_path=self.load["path"], n_ctx=self.load["n_ctx"], n_batch=max(self.load.get("n_batch", 512),
                                                                                         self.load["n_ctx"]),
                    n_ubatch=max(self.load.get("n_batch", 512), self.load["n_ctx"]), n_threads=self.load["n_threads"],
                    n_threads_batch=self.load["n_threads"], n_gpu_layers=self.load.get("n_gpu_layers", 0),
                    main_gpu=self.load.get("main_gpu", 0), tensor_split=self.load.get("tensor_split") or None,
                    embedding=True, pooling_type=pooling, verbose=False)
        n_ctx = self._embedder.n_ctx()
        for i, text in enumerate(inputs):
            n = len(self._embedder.tokenize(text.encode("utf-8"), add_bos=True, special=False))
            if n == 0:  # llama_decode fails on it and leaves the context unsafe to free
                raise RequestError("invalid_request", f"input[{i}] has no tokens", "input")
            if n > n_ctx:
                raise RequestError("context_length_exceeded", f"input[{i}] is {n} tokens; this model embeds at "
                                   f"most {n_ctx}", "input")
        vectors, tokens = self._embedder.embed(inputs, normalize=True, truncate=False, return_count=True)
        return vectors, tokens

    def _loading(self) -> contextlib.ExitStack:
        """Where models are loaded: the weights repacked or as filed, flash attention as set."""
        stack = contextlib.ExitStack()
        if not self.repacked:
            stack.enter_context(load_options.without_repacking(self.llama_cpp.llama_cpp))
        if (self.load.get("flash_attention") or "auto") == "auto":
            stack.enter_context(load_options.flash_attention_auto(self.llama_cpp.llama_cpp))
        return stack

    @staticmethod
    def _open(cls: Any, load: dict[str, Any]) -> list[Any]:
        kv = KV_TYPES[load.get("kv_cache_type") or "f16"]
        return [cls(model_path=load["path"], n_ctx=load["n_ctx"], n_threads=load["n_threads"], type_k=kv, type_v=kv,
                    flash_attn=load.get("flash_attention") == "on",
                    n_threads_batch=load["n_threads"], n_batch=load.get("n_batch", 512),
                    n_gpu_layers=load.get("n_gpu_layers", 0), main_gpu=load.get("main_gpu", 0), logits_all=False,
                    tensor_split=load.get("tensor_split") or None,
                    verbose=bool(load.get("verbose", False)))
                for _ in range(max(1, int(load.get("parallel", 1))))]

    def facts(self) -> dict[str, Any]:
        return {"n_ctx": self.llm.n_ctx(), "n_threads": self.load["n_threads"], "load_s": round(self.load_s, 3),
                "engine": self.kind,
                "warm_up_s": round(self.warm_up_s, 3), "parallel": len(self.llms),
                "n_gpu_layers": self.load.get("n_gpu_layers", 0), "chat_template": self.template_source,
                "tool_format": self.family.name, "reasoning": self._reasoning_split, "repacked": self.repacked,
                "flash_attention": self.load.get("flash_attention") or "auto",
                "kv_cache_type": self.load.get("kv_cache_type") or "f16"}

    @property
    def _reasoning_split(self) -> bool:
        return self.family.reasoning is not None and self.reasoning_setting != "off"

    def _thinking(self, params: dict[str, Any], forced: bool) -> bool | None:
        """The template's thinking switch for this request; None: the template's default.
        A forced tool call leaves no room for thinking: the grammar starts with the call."""
        effort = params.get("reasoning_effort")
        if forced:
            return False
        if effort is not None:
            return effort != "none"
        return False if self.reasoning_setting == "off" else None

    def _render(self, messages: list[dict[str, Any]], params: dict[str, Any], offered: bool, forced: bool):
        kwargs: dict[str, Any] = {}
        if offered:
            kwargs["tools"] = params["tools"]
            kwargs["tool_choice"] = params.get("tool_choice") or "auto"
        thinking = self._thinking(params, forced)
        if self.family.thinking_switch and thinking is not None:
            kwargs[self.family.thinking_switch] = thinking
        try:
            # The OpenAI wire's message dicts: what llama-cpp-python's TypedDicts describe.
            wire = cast("list[ChatCompletionRequestMessage]", template_messages(messages, self.family))
            return self.formatter(messages=wire, **kwargs)
        except Exception as exc:
            raise RequestError("invalid_request", f"messages: the model's chat template rejected them: {exc}",
                               "messages") from None

    def _call_grammar(self, params: dict[str, Any], in_reasoning: bool):
        from llama_cpp import llama_grammar

        # A response_format beside it shapes text answers: a forced call answers with a call,
        # never with text, so the call's grammar is the whole of this reply's.
        try:
            gbnf = forced_call_grammar(self.family, params["tools"], params["tool_choice"],
                                       params.get("parallel_tool_calls") is not False, close_reasoning=in_reasoning)
            return llama_grammar.LlamaGrammar.from_string(gbnf, verbose=False)
        except InvalidRequest as exc:
            raise RequestError("invalid_request", exc.message, exc.param) from None
        except Exception as exc:
            raise RequestError("invalid_request", f"tools: cannot build a grammar from the tools' schemas: {exc}",
                               "tools") from None

    def _grammar(self, rf: dict[str, Any] | None):
        if not rf:
            return None
        from llama_cpp import llama_grammar

        try:
            if rf["type"] == "json_schema":
                schema = (rf.get("json_schema") or {}).get("schema") or {}
                return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            if rf.get("schema"):  # llama-cpp-python's extension: json_object with a schema
                return llama_grammar.LlamaGrammar.from_json_schema(json.dumps(rf["schema"]), verbose=False)
            return llama_grammar.LlamaGrammar.from_string(llama_grammar.JSON_GBNF, verbose=False)
        except Exception as exc:
            raise RequestError("invalid_request", f"response_format: cannot build a grammar from the schema: {exc}",
                               "response_format") from None

    @staticmethod
    def _logit_bias(llm: Any, bias: dict[str, float]) -> dict[int, float]:
        """The biases by token id, refused whole when one is no token of this model.

        Checked before generation: llama-cpp-python applies them in a sampler callback,
        where a bad id is logged (with a traceback) for every token and then ignored.
        """
        n_vocab = llm.n_vocab()
        out: dict[int, float] = {}
        for key, value in bias.items():
            tid = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
            if not 0 <= tid < n_vocab:
                raise RequestError("invalid_request", f"logit_bias: {key[:40]!r} is not a token id of this model "
                                   f"(its vocabulary has {n_vocab} tokens)", "logit_bias")
            out[tid] = float(value)
        return out

    def _raw_prompt(self, llm: Any, text: str, suffix: str | None) -> list[int]:
        """A completions prompt as tokens: as it is, or around the gap before ``suffix`` in the
        model's fill-in-the-middle form (prefix, suffix, then the middle to write)."""
        if suffix is None:
            return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        vocab = self.vocab
        lc = self.llama_cpp
        pre, suf, mid = lc.llama_vocab_fim_pre(vocab), lc.llama_vocab_fim_suf(vocab), lc.llama_vocab_fim_mid(vocab)
        if -1 in (pre, suf, mid):
            raise RequestError("invalid_request", "suffix: this model has no fill-in-the-middle tokens (a code "
                               "model's); send the prompt alone", "suffix")
        bos = [self.bos_id] if lc.llama_vocab_get_add_bos(vocab) and self.bos_id != -1 else []
        return (bos + [pre] + llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) + [suf]
                + llm.tokenize(suffix.encode("utf-8"), add_bos=False, special=False) + [mid])

    def _continued(self, llm: Any, context: Any, prompt: list[int]) -> list[int]:
        """``prompt`` going on from the tokens of an earlier prompt and reply (Ollama's
        ``context``): checked against the vocabulary (llama.cpp must never see an id it does
        not have), and without a start-of-sequence token of its own in the middle."""
        n_vocab = llm.n_vocab()
        if not isinstance(context, list) or not all(type(t) is int and 0 <= t < n_vocab for t in context):
            raise RequestError("invalid_request", f"context: a list of this model's token ids (0 to {n_vocab - 1})",
                               "context")
        bos = self.bos_id
        if prompt and bos != -1 and prompt[0] == bos:
            prompt = prompt[1:]
        return [*context, *prompt]

    def count(self, llm: Any, messages: list[dict[str, Any]], params: dict[str, Any],
              images: list[str] | None = None) -> int:
        """The prompt tokens of a chat, rendered as ``chat`` would render it, its images
        counted in the positions the projector gives them."""
        offered, forced = _tool_mode(params)
        fmt = self._render(messages, params, offered, forced)
        if images:
            return self._with_images(images, lambda vision, data: vision.count(fmt.prompt, data,
                                                                               not fmt.added_special))
        return len(llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True))

    def _image_prompt(self, llm: Any, text: str, images: list[str], add_special: bool) -> list[int]:
        """A rendered prompt with its images evaluated into ``llm``'s context (the returned
        tokens match it there: create_completion reads nothing again)."""
        return self._with_images(images, lambda vision, data: vision.eval_prompt(llm, text, data, add_special).tokens)

    def _with_images(self, images: list[str], use: Callable[[Any, list[bytes]], T]) -> T:
        """``use(vision, decoded images)``, its ImageError as the request's error."""
        import base64

        from anyad.backends.llama_cpp.vision import ImageError

        if self.vision is None:
            raise RequestError("invalid_request", "this model has no vision projector (mmproj)", "messages")
        try:
            return use(self.vision, [base64.b64decode(i) for i in images])
        except ImageError as exc:
            # The daemon knows two request errors: a prompt too long for the context, and the rest.
            code = exc.code if exc.code == "context_length_exceeded" else "invalid_request"
            raise RequestError(code, exc.message, exc.param) from None

    def chat(self, llm: Any, rid: int, messages: list[dict[str, Any]], params: dict[str, Any], cancelled: set[int],
             out: Output, raw: bool = False, images: list[str] | None = None) -> None:
        """A reply for each prompt (one from a chat, or each of a completions request's), each
        of ``n`` choices, streamed as frames; choice i*n+j is prompt i's j-th."""
        stop = list(params.get("stop") or [])
        offered = forced = in_reasoning = False
        if raw:
            prompts = [self._raw_prompt(llm, m["content"], params.get("suffix")) for m in messages]
            for i, prompt in enumerate(prompts):
                if not prompt:  # nothing to continue from (the model adds no start token of its own)
                    raise RequestError("invalid_request", f"prompt{f'[{i}]' if len(prompts) > 1 else ''} is "
                                       "empty: this model needs at least one token to continue from", "prompt")
            criteria = grammar = None
        else:
            offered, forced = _tool_mode(params)
            fmt = self._render(messages, params, offered, forced)
            # A template may open the thinking block itself (DeepSeek-R1's), even with thinking off.
            in_reasoning = opens_reasoning(self.family, fmt.prompt)
            prompts = [self._image_prompt(llm, fmt.prompt, images, not fmt.added_special) if images else
                       llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)]
            if fmt.stop:
                stop += [fmt.stop] if isinstance(fmt.stop, str) else list(fmt.stop)
            criteria = fmt.stopping_criteria
            grammar = self._call_grammar(params, in_reasoning) if forced \
                else self._grammar(params.get("response_format"))
        if params.get("context"):
            if len(prompts) != 1 or images:
                raise RequestError("invalid_request", "context: continues one prompt, without images", "context")
            prompts = [self._continued(llm, params["context"], prompts[0])]
        n_ctx = llm.n_ctx()
        for i, prompt in enumerate(prompts):
            if len(prompt) >= n_ctx:
                what, param = ("prompt", "prompt") if raw else ("messages", "messages")
                raise RequestError("context_length_exceeded",
                                   f"This model's maximum context length is {n_ctx} tokens. However, your "
                                   f"{what}{f'[{i}]' if len(prompts) > 1 else ''} resulted in {len(prompt)} tokens. "
                                   f"Please reduce the length of the {what}.", param)
        kwargs: dict[str, Any] = {
            "max_tokens": params.get("max_tokens") or -1,  # -1: up to the end of the context window
            "stop": stop,
            "stopping_criteria": criteria,
            "grammar": grammar,
            "stream": True,
        }
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("min_p", "min_p"), ("repeat_penalty", "repeat_penalty"),
                             ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                             ("seed", "seed")):
            if params.get(ours) is not None:
                kwargs[theirs] = params[ours]
        if params.get("logit_bias"):
            kwargs["logit_bias"] = self._logit_bias(llm, params["logit_bias"])
        if params.get("ignore_eos"):  # as llama.cpp's server: every end-of-generation token barred
            kwargs["logit_bias"] = {**kwargs.get("logit_bias", {}), **dict.fromkeys(self.eog_tokens(), -math.inf)}

        n = int(params.get("n") or 1)
        seed = params.get("seed")
        completion = 0
        cached: int | None = None
        last = len(prompts) * n - 1
        split = self._reasoning_split and not raw
        choose = self._choice if self.ctx is None else self._choice_batched
        for index in range(last + 1):
            prompt = prompts[index // n]
            if seed is not None:  # the same seed for every choice would give n copies of one
                kwargs["seed"] = seed + index
            # Every choice after a prompt's first reuses that prompt in the context (llama.cpp
            # keeps the longest common prefix): a prompt is read once, whatever n is.
            result = choose(llm, rid, index, prompt, kwargs, params, offered, forced, split, in_reasoning,
                            cancelled, out)
            completion += result.completion
            if result.cached is not None and index % n == 0:  # a prompt's first read says what it reused
                cached = (cached or 0) + result.cached
            frame: dict[str, Any] = {"t": "finish" if index < last and result.finish != "cancelled" else "end",
                                     "id": rid, "finish_reason": result.finish}
            if index:
                frame["index"] = index
            if result.note:
                frame["note"] = result.note
            if frame["t"] == "end":
                frame["usage"] = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": completion}
                if cached is not None:
                    frame["usage"]["cached_tokens"] = cached
                if params.get("return_tokens") and len(prompts) == 1:  # the prompt's and the reply's
                    frame["tokens"] = [*prompt, *result.tokens]
            out.write(frame)
            if frame["t"] == "end":
                return

    def _parser(self, params: dict[str, Any], offered: bool, forced: bool, split: bool,
                in_reasoning: bool) -> ReplyParser | None:
        if not (offered or split):
            return None
        return ReplyParser(self.family, tools=offered, reasoning=split,
                           parallel=params.get("parallel_tool_calls") is not False,
                           reasoning_inline=params.get("reasoning_format") == "none",
                           started_in_reasoning=split and in_reasoning, forced=forced)

    def _sender(self, out: Output, index: int, logprobs: TokenLogprobs | None) -> Callable[..., None]:
        def send(frame: dict[str, Any], entries: list[dict[str, Any]] | None = None) -> None:
            # A token's log probability goes with the first piece of the reply after it; the
            # tokens of a stop sequence never reach the client, nor do theirs.
            if entries is None and logprobs is not None:
                entries = logprobs.take()
            if entries:
                frame["logprobs"] = entries
            if index:
                frame["index"] = index
            out.write(frame)
        return send

    @staticmethod
    def _closed(parser: ReplyParser | None, finish: str, rid: int, send: Callable[..., None],
                entries: list[dict[str, Any]] | None = None) -> tuple[str, str | None]:
        """The parser's last events sent (the first with ``entries``, the log probabilities
        of what the parser held); the finish reason (tool_calls where it kept calls) and a
        note when a call it wrote came back as text."""
        note = None
        if parser is not None and finish != "cancelled":
            events, note = parser.close()
            for frame in delta_frames(rid, events):
                send(frame, entries)
                entries = []
            if parser.calls and finish == "stop":  # calls the parser kept count, even beside a malformed one
                finish = "tool_calls"
        return finish, note

    def _choice(self, llm: Any, rid: int, index: int, prompt: list[int], kwargs: dict[str, Any],
                params: dict[str, Any], offered: bool, forced: bool, split: bool, in_reasoning: bool,
                cancelled: set[int], out: Output) -> Choice:
        """One choice on a slot's own context (``Llama``), streamed as delta frames."""
        parser = self._parser(params, offered, forced, split, in_reasoning)
        llm.sampled = 0
        llm.last_token = -1
        llm.record = [] if params.get("return_tokens") else None
        top = params.get("logprobs")
        logprobs = llm.logprobs = None if top is None else TokenLogprobs(
            int(top), piece_reader(self.llama_cpp, self.vocab))
        send = self._sender(out, index, logprobs)
        finish = "stop"
        try:
            for chunk in llm.create_completion(prompt, **kwargs):
                if rid in cancelled:
                    finish = "cancelled"
                    break
                choice = chunk["choices"][0]
                if choice["text"]:
                    if parser is None:
                        send({"t": "delta", "id": rid, "text": choice["text"]})
                    else:
                        for frame in delta_frames(rid, parser.feed(choice["text"])):
                            send(frame)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        finally:
            llm.logprobs = None
        finish, note = self._closed(parser, finish, rid, send)
        completion = llm.sampled
        if completion and finish in ("stop", "tool_calls") and \
                self.llama_cpp.llama_vocab_is_eog(self.vocab, llm.last_token):
            completion -= 1  # the end-of-turn token is not part of the reply
        reply = (llm.record or [])[:completion]
        llm.record = None
        return Choice(finish, completion, note, reply, None)

    def _choice_batched(self, llm: Any, rid: int, index: int, prompt: list[int], kwargs: dict[str, Any],
                        params: dict[str, Any], offered: bool, forced: bool, split: bool, in_reasoning: bool,
                        cancelled: set[int], out: Output) -> Choice:
        """One choice as a sequence of the shared context, streamed as delta frames."""
        ctx = self.ctx
        assert ctx is not None
        if rid in cancelled:
            return Choice("cancelled", 0, None, [], 0)
        parser = self._parser(params, offered, forced, split, in_reasoning)
        top = params.get("logprobs")
        logprobs = None if top is None else TokenLogprobs(int(top), piece_reader(self.llama_cpp, self.vocab))
        events: queue.SimpleQueue[tuple[BatchedEvent, list[dict[str, Any]]]] = queue.SimpleQueue()

        def sink(ev: BatchedEvent) -> None:
            # On the stepping thread, right after the logits of the tokens in ``ev`` were
            # observed: the entries taken here are exactly this piece's.
            events.put((ev, logprobs.take() if logprobs is not None and isinstance(ev, Delta) else []))

        def observe(row: Any, token: int) -> None:
            if logprobs is not None and not ctx.is_eog(token):
                logprobs.add(row, token)

        try:
            handle = ctx.submit(prompt, generation_params(kwargs), on_event=sink,
                                on_logits=observe if logprobs is not None else None,
                                conversation=params.get("conversation"))
        except RequestRejected as exc:
            param = ("tools" if forced else "response_format") if exc.param == "grammar" else exc.param
            raise RequestError(exc.code, exc.message, param) from None
        with self._handles_lock:
            self._handles[rid] = handle
        if rid in cancelled:  # a cancel that came before the handle was known
            ctx.cancel(handle)
        send = self._sender(out, index, None)
        ended = False
        held: list[dict[str, Any]] = []  # entries of text the parser holds for now: they wait with it
        try:
            while True:
                ev, entries = events.get()
                if isinstance(ev, Delta):
                    entries = held + entries
                    held = []
                    if parser is None:
                        send({"t": "delta", "id": rid, "text": ev.text}, entries)
                    else:
                        frames = delta_frames(rid, parser.feed(ev.text))
                        for frame in frames:
                            send(frame, entries)
                            entries = []
                        held = entries
                    continue
                ended = True
                if ev.reason == "error":
                    raise RuntimeError(ev.error or "the batched context failed")
                finish, note = self._closed(parser, ev.reason, rid, send, held)
                return Choice(finish, ev.usage.completion_tokens, note, list(ev.tokens), ev.usage.cached_tokens)
        finally:
            with self._handles_lock:
                self._handles.pop(rid, None)
            if not ended:  # this thread failed mid-reply: the sequence must not go on without a reader
                ctx.cancel(handle)


@dataclasses.dataclass(frozen=True)
class Choice:
    """How one choice ended."""

    finish: str
    completion: int  # tokens of the reply, the end-of-turn one aside
    note: str | None  # a tool call it wrote came back as text
    tokens: list[int]  # the reply's token ids (for return_tokens)
    cached: int | None  # prompt tokens found in the KV cache and not read again; None: not known


def engine_kind(load: dict[str, Any]) -> str:
    return load_options.engine_for(load.get("engine") or "auto", bool(load.get("mmproj")))


def context_settings(load: dict[str, Any]) -> ContextSettings:
    return ContextSettings(
        path=load["path"], n_ctx=int(load["n_ctx"]), parallel=max(1, int(load.get("parallel", 1))),
        # Micro-batches of at most 512, as Llama's default (and what the memory estimate counts).
        n_batch=int(load.get("n_batch", 512)), n_ubatch=min(int(load.get("n_batch", 512)), 512),
        n_threads=load.get("n_threads"), n_gpu_layers=int(load.get("n_gpu_layers", 0)),
        main_gpu=int(load.get("main_gpu", 0)), tensor_split=tuple(load.get("tensor_split") or ()),
        repack=load.get("repack") or "auto",
        kv_type=load.get("kv_cache_type") or "f16", flash_attention=load.get("flash_attention") or "auto",
        prompt_cache_bytes=int(load.get("prompt_cache_bytes") or 0), prompt_cache_dir=load.get("prompt_cache_dir"),
        prompt_cache_disk_bytes=int(load.get("prompt_cache_disk_bytes") or 0),
        verbose=bool(load.get("verbose", False)))


def generation_params(kwargs: dict[str, Any]) -> GenerationParams:
    """``create_completion``'s keyword arguments, as the batched context takes them."""
    fields = {k: kwargs[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                     "presence_penalty", "frequency_penalty", "seed") if k in kwargs}
    grammar = kwargs.get("grammar")
    return GenerationParams(**fields, logit_bias=dict(kwargs.get("logit_bias") or {}),
                            grammar=grammar._grammar if grammar is not None else None,
                            max_tokens=kwargs.get("max_tokens"), stop=tuple(kwargs.get("stop") or ()))


class ContextView:
    """The shared context as the prompt-building code reads a ``Llama``: its tokenizer and sizes."""

    def __init__(self, ctx: BatchedContext) -> None:
        self.ctx = ctx

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.ctx.tokenize(text, add_special=add_bos, parse_special=special)

    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    def n_vocab(self) -> int:
        return self.ctx.n_vocab


class Output:
    """Frames to the daemon, from the generating thread and the reader thread alike."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._lock = threading.Lock()

    def write(self, obj: dict[str, Any]) -> None:
        with self._lock:
            protocol.write_frame_sync(self._f, obj)


def _reader(inp: IO[bytes], ops: "queue.Queue[dict[str, Any]]", cancelled: set[int], out: Output,
            engine: Engine, busy: set[int]) -> None:
    while True:
        frame = protocol.read_frame_sync(inp)
        if frame is None or frame.get("op") == "shutdown":
            cancelled.update(busy)  # stop running generations at the next token
            for rid in list(busy):
                engine.cancel(rid)
            for _ in engine.llms:
                ops.put({"op": "shutdown"})
            if frame is None:
                # The daemon is gone; nobody will read what we generate.
                os._exit(0)
            return
        if frame.get("op") == "cancel":
            cancelled.add(frame["id"])
            engine.cancel(frame["id"])
        elif frame.get("op") == "stats":
            # Answered here, not queued: stats must not wait behind a generation.
            out.write({"t": "stats", "id": frame["id"], "busy": bool(busy), "active": len(busy),
                       **engine.stats()})
        else:
            ops.put(frame)


def _serve(engine: Engine, llm: Any, ops: "queue.Queue[dict[str, Any]]", cancelled: set[int], out: Output,
           busy: set[int]) -> None:
    """One slot: takes operations off the shared queue and runs them on its own context."""
    while True:
        op = ops.get()
        if op["op"] == "shutdown":
            return
        rid = op["id"]
        busy.add(rid)
        try:
            if op["op"] == "count":
                out.write({"t": "end", "id": rid, "tokens": engine.count(llm, op["messages"], op.get("params") or {},
                                                                     op.get("images"))})
            elif op["op"] == "embed":
                vectors, tokens = engine.embed(op["input"])
                out.write({"t": "end", "id": rid, "embeddings": vectors, "usage": {"prompt_tokens": tokens}})
            elif rid not in cancelled:
                engine.chat(llm, rid, op["messages"], op.get("params") or {}, cancelled, out, bool(op.get("raw")),
                            op.get("images"))
            else:
                out.write({"t": "end", "id": rid, "finish_reason": "cancelled", "usage": None})
        except RequestError as exc:
            out.write({"t": "error", "id": rid, "code": exc.code, "message": exc.message, "param": exc.param})
        except Exception as exc:
            traceback.print_exc()
            out.write({"t": "error", "id": rid, "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            busy.discard(rid)
            cancelled.discard(rid)


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group: the daemon decides when a
    # worker stops (after draining), not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep fd 1 for frames only: anything native code prints goes to stderr.
    out = Output(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer

    out.write({"t": "hello", "version": protocol.PROTOCOL_VERSION, "pid": os.getpid()})
    load = protocol.read_frame_sync(inp)
    if load is None:
        return 0
    try:
        engine = Engine(load)
    except Exception as exc:
        out.write({"t": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    out.write({"t": "ready", **engine.facts()})

    ops: queue.Queue[dict[str, Any]] = queue.Queue()
    cancelled: set[int] = set()
    busy: set[int] = set()
    threading.Thread(target=_reader, args=(inp, ops, cancelled, out, engine, busy), daemon=True).start()
    slots = [threading.Thread(target=_serve, args=(engine, llm, ops, cancelled, out, busy), daemon=True)
             for llm in engine.llms[1:]]
    for t in slots:
        t.start()
    _serve(engine, engine.llm, ops, cancelled, out, busy)
    for t in slots:
        t.join()
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
