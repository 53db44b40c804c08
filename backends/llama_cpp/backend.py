"""The llama_cpp backend: a local GGUF model, placed by the scheduler, run in a worker process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
from contextlib import aclosing
from pathlib import Path
from typing import Any

import psutil

from anyad.backend import Backend, Embeddings, ModelInfo
from anyad.backends.llama_cpp.load_options import engine_for
from anyad.config import ModelDefaults, ModelSettings
from anyad.errors import BackendError, ConfigError, ContextLengthExceeded, InvalidRequest, Unavailable
from anyad.fields import check_local
from anyad.gguf_meta import GGUFInfo, read_gguf_info
from anyad.integrity import verify
from anyad.memory import MIB, Estimate, ModelShape, estimate, read_shape
from anyad.placement import Placement
from anyad.resources import cpu_repacks_weights, worker_env
from anyad.scheduler import Scheduler
from anyad.stream import ChatRequest, Chunk, ChunkStream, Usage
from anyad.workers import WorkerProcess

log = logging.getLogger("anyad.backends.llama_cpp")

WORKER_MODULE = "anyad.backends.llama_cpp.worker"


def default_threads() -> int:
    """Physical cores: llama.cpp decodes no faster on hyper-threads, and llama-cpp-python's
    own default (half the logical CPUs) leaves real cores idle on small machines."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def context_size(model_id: str, info: GGUFInfo, settings: ModelSettings, defaults: ModelDefaults,
                 notes: list[str]) -> int:
    """The context to allocate; a configured one longer than the model's is capped (with a note)."""
    trained = info.context_length
    if settings.n_ctx is not None:
        if trained and settings.n_ctx > trained:
            note = (f"n_ctx {settings.n_ctx} is longer than the {trained} tokens the model was trained on; "
                    f"capped at {trained}")
            log.warning("model %s: %s", model_id, note)
            notes.append(note)
            return trained
        return settings.n_ctx
    return min(trained or defaults.max_context, defaults.max_context)


# Where an image goes in a rendered prompt: libmtmd's marker (the worker's Vision.media_marker).
MEDIA_MARKER = "<__media__>"
DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,(.*)$", re.S)


def _image(part: dict[str, Any], where: str) -> str:
    """An image part's bytes, as base64 (the worker decodes them and checks what they are)."""
    url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
    m = DATA_URL.match(url) if isinstance(url, str) else None
    if m is None:
        raise InvalidRequest("image_url: only data: URLs (data:image/...;base64,...) are read; anyad does not "
                             "fetch images from the network", param=f"{where}.image_url")
    data = "".join(m.group(1).split())
    try:
        base64.b64decode(data, validate=True)
    except ValueError:
        raise InvalidRequest("image_url: the data is not base64", param=f"{where}.image_url") from None
    return data


def flatten_messages(messages: list[dict[str, Any]], vision: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages with their content as one string, as chat templates expect, and the images
    they carry (base64, in order).

    Text parts are joined. On a model with a vision projector (``vision``) each image part
    becomes the marker where libmtmd puts it (a marker a client wrote itself is taken out of
    its text, so markers and images match); on any other model, and for parts of any other
    kind, the part is refused: a text-only model would answer as if it had seen it.
    """
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type")
                if kind == "image_url" and vision:
                    images.append(_image(part, f"messages[{i}].content[{j}]"))
                    texts.append(MEDIA_MARKER)
                    continue
                if kind != "text" or not isinstance(part.get("text"), str):
                    what = "this local model has no vision projector (`mmproj`)" if kind == "image_url" else \
                        "only 'text' and 'image_url' parts are" if vision else "only 'text' parts are"
                    raise InvalidRequest(f"content part type {kind!r} is not supported: {what}",
                                         param=f"messages[{i}].content[{j}].type")
                texts.append(part["text"].replace(MEDIA_MARKER, "") if vision else part["text"])
            content = "".join(texts)
        elif vision and isinstance(content, str):
            content = content.replace(MEDIA_MARKER, "")
        out.append({**m, "content": content or ""})
    return out, images


def delta_chunk(frame: dict[str, Any]) -> Chunk:
    """A worker's delta frame as a chunk: text, reasoning and tool-call deltas (see anyad.protocol)."""
    reasoning = frame.get("reasoning")
    logprobs = frame.get("logprobs")
    return Chunk(text=frame.get("text", ""), index=frame.get("index", 0), tool_calls=frame.get("tool_calls"),
                 extra={"reasoning_content": reasoning} if reasoning else None,
                 logprobs={"content": logprobs, "refusal": None} if logprobs else None)


def header_safe(note: str, limit: int = 200) -> str:
    """A worker's note fit for a log line and a response header: printable ASCII, one line, short."""
    return "".join(c if " " <= c <= "~" else "?" for c in note)[:limit]


class LlamaCppBackend(Backend):
    kind = "llama_cpp"

    def __init__(self, model_id: str, info: GGUFInfo, shape: ModelShape, settings: ModelSettings,
                 defaults: ModelDefaults, scheduler: Scheduler, data_dir: Path | None = None) -> None:
        self.name = self.model_id = model_id
        self.info = info
        self.shape = shape
        self.settings = settings
        self.policy = settings.policy(defaults)
        notes: list[str] = []
        self.n_ctx = context_size(model_id, info, settings, defaults, notes)
        self.n_threads = settings.n_threads or default_threads()
        self._base_load = {"path": str(info.path), "n_ctx": self.n_ctx, "n_threads": self.n_threads,
                           "n_batch": settings.n_batch, "tool_format": settings.tool_format,
                           "reasoning": settings.reasoning, "repack": settings.repack,
                           "flash_attention": settings.flash_attention,
                           "kv_cache_type": settings.kv_cache_type}
        self.mmproj = settings.mmproj
        self._projector_bytes = 0
        if self.mmproj is not None:
            from anyad.backends.llama_cpp.vision import projector_bytes

            if not self.mmproj.is_file():
                raise ConfigError(f"models.{model_id}.mmproj: no such file: {self.mmproj}")
            try:
                self._projector_bytes = projector_bytes(self.mmproj)
            except Exception as exc:
                raise ConfigError(f"models.{model_id}.mmproj: {self.mmproj} is not a GGUF projector: {exc}") from None
            self._base_load["mmproj"] = str(self.mmproj)
            if settings.engine == "batched":
                raise ConfigError(f"models.{model_id}: engine = \"batched\" does not read images yet; a model with "
                                  "a vision projector (mmproj) needs engine = \"slots\" or \"auto\"")
        self.engine = engine_for(settings.engine, self.mmproj is not None)
        self._base_load["engine"] = self.engine  # decided here, once: the estimate depends on it
        self._cache_bytes = 0
        if self.engine == "batched":
            self._cache_bytes = settings.prompt_cache_mib * MIB
            self._base_load["prompt_cache_bytes"] = self._cache_bytes
            if data_dir is not None and settings.prompt_cache_disk_mib:
                # A folder per model id: two ids on one file are two caches, each with its own cap.
                folder = hashlib.sha256(model_id.encode()).hexdigest()[:16]
                self._base_load["prompt_cache_dir"] = str(data_dir / "prompt-cache" / folder)
                self._base_load["prompt_cache_disk_bytes"] = settings.prompt_cache_disk_mib * MIB
        self.worker = WorkerProcess(model_id, WORKER_MODULE, dict(self._base_load),
                                    load_timeout_s=self.policy.load_timeout_s)
        self.scheduler = scheduler
        scheduler.register(self, self.policy, notes)
        self._estimates: dict[int, Estimate] = {}
        self._created = int(info.path.stat().st_mtime)

    @classmethod
    def from_model(cls, model_id: str, settings: ModelSettings, defaults: ModelDefaults,
                   scheduler: Scheduler, *, data_dir: Path | None = None) -> "LlamaCppBackend":
        info = read_gguf_info(settings.path)
        return cls(model_id, info, read_shape(info.path), settings, defaults, scheduler, data_dir=data_dir)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=self.model_id, owned_by="local", created=self._created,
                          meta={"context_length": self.n_ctx, "architecture": self.info.architecture,
                                **({"vision": True} if self.mmproj is not None else {})})]

    def identity(self, model: str) -> str:
        # A replaced or re-downloaded file is another model, even under the same id.
        st = self.info.path.stat()
        return f"llama_cpp:{self.info.path}:{st.st_size}:{st.st_mtime_ns}:{self.n_ctx}"

    # What the scheduler drives (anyad.scheduler.Loadable).

    @property
    def loaded(self) -> bool:
        return self.worker.loaded

    @property
    def pid(self) -> int | None:
        return self.worker.pid

    def estimate(self, parallel: int) -> Estimate:
        est = self._estimates.get(parallel)
        if est is None:
            # llama-cpp-python computes in micro-batches of at most 512 tokens.
            est = self._estimates[parallel] = estimate(self.shape, self.n_ctx,
                                                       n_ubatch=min(self.settings.n_batch, 512), parallel=parallel,
                                                       repack=cpu_repacks_weights(),
                                                       shared=self.engine == "batched",
                                                       cache_type=self.settings.kv_cache_type,
                                                       prompt_cache_bytes=self._cache_bytes,
                                                       projector_bytes=self._projector_bytes)
        return est

    async def load(self, placement: Placement, *, parallel: int, warm_up: bool) -> None:
        if self.settings.sha256:  # before any load; remembered, so only a changed file is hashed again
            await asyncio.to_thread(verify, self.model_id, self.info.path, self.settings.sha256)
        # The worker sees only the GPU it was placed on (as device 0), or none.
        self.worker.env = worker_env(placement.gpus)
        self.worker.load = {**self._base_load, "n_gpu_layers": placement.gpu_layers, "main_gpu": 0,
                            "parallel": parallel, "warm_up": warm_up}
        if placement.split:  # the shares, in the order the worker sees the GPUs
            self.worker.load["tensor_split"] = [share for _, share, _ in placement.split]
        await self.worker.ensure_started()

    async def unload(self) -> None:
        await self.worker.stop(grace_s=self._stop_grace_s)

    @property
    def _stop_grace_s(self) -> float:
        # A worker with a prompt cache on disk writes its slots there as it stops: give it time.
        return 60.0 if "prompt_cache_dir" in self._base_load else 5.0

    # The Backend interface.

    async def start(self) -> None:
        if self.policy.preload:
            await self.scheduler.load(self.model_id)

    def ready(self) -> bool:
        return self.scheduler.ready(self.model_id)

    def status(self) -> dict[str, Any]:
        facts = self.worker.facts if self.worker.loaded else {}
        out = {"loaded": self.worker.loaded, "pid": self.worker.pid, "n_ctx": facts.get("n_ctx", self.n_ctx),
               "n_threads": self.n_threads, **self.scheduler.status(self.model_id)}
        if "repacked" in facts:
            out["repacked"] = facts["repacked"]  # the weights laid out for the CPU's matrix units
            out["flash_attention"] = facts["flash_attention"]
        for key in ("engine", "kv_cache_type"):
            if key in facts:
                out[key] = facts[key]
        return out

    async def chat(self, request: ChatRequest, model: str) -> ChunkStream:
        messages, images = flatten_messages(request.messages, vision=self.mmproj is not None)
        op: dict[str, Any] = {"op": "chat", "messages": messages, "params": request.params.as_dict()}
        if request.route_key and request.route_key.startswith("conversation:"):
            # The client's conversation id: the engine prefers the slot that served it last.
            op["params"]["conversation"] = request.route_key.removeprefix("conversation:")
        if images:
            op["images"] = images
        if request.raw:
            op["raw"] = True  # a completions request: its fields were checked by its schema
        else:
            check_local(request.body)
        async with self.scheduler.use(self.model_id, request.keep_alive):
            async with aclosing(self.worker.request(op)) as frames:
                async for frame in frames:
                    t = frame["t"]
                    if t == "delta":
                        yield delta_chunk(frame)
                    elif t in ("finish", "end"):  # a choice's end; "end" is the last one's, with the usage
                        if frame["finish_reason"] == "cancelled":
                            # Stopped by the worker's own shutdown while this reply was still read: the
                            # client must not take the cut reply for a whole one.
                            raise Unavailable(f"model {self.model_id!r}: the reply was cut off (the model was "
                                              "unloaded or the daemon is stopping); ask again")
                        u = frame.get("usage")
                        note = frame.get("note")
                        if note:
                            note = header_safe(note)
                            log.info("model %s: a tool call was returned as text: %s", self.model_id, note)
                        yield Chunk(index=frame.get("index", 0), finish_reason=frame["finish_reason"], note=note,
                                    usage=None if u is None else Usage(u.get("prompt_tokens", 0),
                                                                       u.get("completion_tokens", 0),
                                                                       u.get("cached_tokens")),
                                    tokens=frame.get("tokens"))
                    elif t == "error":
                        self._raise(frame)

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        check_local(request.body)
        messages, images = flatten_messages(request.messages, vision=self.mmproj is not None)
        op = {"op": "count", "messages": messages, "params": request.params.as_dict(), "images": images}
        async with self.scheduler.use(self.model_id):  # the template and the vocabulary are the worker's
            async for frame in self.worker.request(op):
                if frame["t"] == "error":
                    self._raise(frame)
                return int(frame["tokens"])
        raise BackendError(f"model {self.model_id!r}: no count")  # pragma: no cover

    async def embed(self, inputs: list[str] | list[list[int]], model: str,
                    options: dict[str, Any] | None = None) -> Embeddings:
        if (options or {}).get("dimensions") is not None:
            raise InvalidRequest("dimensions is not supported by local models", param="dimensions")
        if any(not isinstance(x, str) for x in inputs):
            raise InvalidRequest("this local model embeds text; send strings, not token arrays", param="input")
        async with self.scheduler.use(self.model_id):
            async for frame in self.worker.request({"op": "embed", "input": inputs}):
                if frame["t"] == "error":
                    self._raise(frame)
                return Embeddings(frame["embeddings"], frame["usage"]["prompt_tokens"])
        raise BackendError(f"model {self.model_id!r}: no embeddings")  # pragma: no cover

    def _raise(self, frame: dict[str, Any]) -> None:
        code, msg = frame.get("code"), frame.get("message", "the worker failed")
        if code == "context_length_exceeded":
            raise ContextLengthExceeded(msg, param=frame.get("param"))
        if code == "invalid_request":
            raise InvalidRequest(msg, param=frame.get("param"))
        raise BackendError(f"model {self.model_id!r}: {msg}")

    async def close(self) -> None:
        await self.worker.stop(grace_s=self._stop_grace_s)
