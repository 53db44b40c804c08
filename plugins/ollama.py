"""Ollama's own API on its own listener (127.0.0.1:11434 by default), over anyad's models.

For the many tools that speak only Ollama: ``/api/chat`` and ``/api/generate``
(NDJSON streaming by default, ``stream: false``, ``options``, ``format``, ``keep_alive``;
on generate also ``raw``, ``suffix`` and ``context``), ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/embed`` (and the older ``/api/embeddings``), ``/api/version``, and
``GET /``; and Ollama's model store (``/api/pull``, ``/api/delete``, ``/api/copy``,
``/api/create``, ``/api/blobs/…``: ``ollama_models``). Requests go through the same
router, scheduler, history, cache, API keys, limits and metrics as the OpenAI API;
errors come in Ollama's shape, ``{"error": "..."}``. Model names resolve as Ollama's do
(``llama3`` is ``llama3:latest``).

Enable with ``[plugins] enabled = ["ollama"]``; ``[plugins.ollama]`` takes ``host``,
``port`` and ``registry`` (the Ollama-style registry ``/api/pull`` pulls from; none by
default). A host beyond loopback needs ``server.api_keys``, as the main listener does.
"""

from __future__ import annotations

import hashlib
import logging
import time
import weakref
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import anyad
from anyad import embedflow, errors, modelops
from anyad.access import admit, check_bind
from anyad.chatflow import ChatFlow
from anyad.config import parse_keep_alive
from anyad.daemon import DAEMON
from anyad.fields import check_ollama
from anyad.jsoncodec import dumpb, loads
from anyad.plugins import ollama_modelfile, ollama_models
from anyad.plugins.ollama_registry import check_registry
from anyad.request_context import identity, read_json
from anyad.schemas import check_inputs, parse_chat_request, parse_completion_request
from anyad.server import gateway_app
from anyad.stream import Chunk

log = logging.getLogger("anyad.ollama")

# What /api/version answers: clients check for a minimum, and anyad speaks this much of the API.
OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
EPOCH_ISO = "1970-01-01T00:00:00Z"


class OllamaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(11434, ge=0, le=65535)
    # The Ollama-style registry /api/pull pulls from ("http://HOST:PORT"); unset: pulling is off.
    registry: str | None = None

    _registry = field_validator("registry")(lambda cls, v: None if v is None else check_registry(v))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


FOREVER_ISO = "2318-01-01T00:00:00Z"  # what Ollama says of a model kept loaded for ever


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # a keep_alive of centuries: past what a date can say
        return FOREVER_ISO


# -- requests: Ollama's fields → the OpenAI body anyad validates ------------------------------

OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
                 "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop"}


def _openai_body(body: dict[str, Any], messages: list[dict[str, Any]], model: str | None = None) -> dict[str, Any]:
    """``model``: the id the request's name stands for (``_resolve``)."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise errors.InvalidRequest("options must be an object", param="options")
    out: dict[str, Any] = {"model": model or body.get("model"), "messages": messages,
                           "stream": body.get("stream", True) is not False}
    for src, dst in OPTION_FIELDS.items():
        if options.get(src) is not None:
            out[dst] = options[src]
    n = options.get("num_predict")
    if isinstance(n, int) and n > 0:
        out["max_tokens"] = n
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise errors.InvalidRequest('format must be "json" or a JSON schema', param="format")
    if body.get("keep_alive") is not None:
        out["keep_alive"] = body["keep_alive"]
    if body.get("tools"):
        out["tools"] = body["tools"]
    if body.get("logprobs"):
        out["logprobs"] = True
        if body.get("top_logprobs"):
            out["top_logprobs"] = body["top_logprobs"]
    elif body.get("top_logprobs"):
        raise errors.InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    think = body.get("think")
    if think is not None:
        # true/false, or gpt-oss's levels; a local model's template switch follows it.
        if think not in (True, False, "low", "medium", "high"):
            raise errors.InvalidRequest('think must be true, false, "low", "medium" or "high"', param="think")
        out["reasoning_effort"] = {True: "medium", False: "none"}.get(think, think)
    return out


def _message(m: Any) -> dict[str, Any]:
    """One Ollama message → OpenAI's: images become image parts, tool-call arguments a JSON
    string, and no content the empty one (Ollama's reading of a message without it)."""
    if not isinstance(m, dict):
        raise errors.InvalidRequest("each message must be an object", param="messages")
    out = {k: v for k, v in m.items() if k not in ("images", "tool_calls", "thinking", "tool_name")}
    if out.get("content") is None:
        out["content"] = ""
    images = m.get("images") or []
    if not isinstance(images, list) or not all(isinstance(img, str) for img in images):
        raise errors.InvalidRequest("messages.images must be a list of base64 strings", param="messages.images")
    if images:
        out["content"] = [{"type": "text", "text": out["content"]}] + [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}} for img in images]
    calls = m.get("tool_calls")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(tc, dict) and isinstance(tc.get("function"), dict)
                                                  for tc in calls):
            raise errors.InvalidRequest("messages.tool_calls must be a list of objects, each with a function "
                                        "object", param="messages.tool_calls")
        out["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                              "function": {"name": tc["function"].get("name"),
                                           "arguments": dumpb(tc["function"].get("arguments", {})).decode()}}
                             for i, tc in enumerate(calls)]
    if m.get("tool_name"):
        out["name"] = m["tool_name"]
    return out


def _tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool calls (arguments as a JSON string) → Ollama's (arguments as an object).

    They come from a provider's reply: a malformed one loses its arguments, not the reply."""
    if not calls or not isinstance(calls, list):
        return None
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            continue
        raw = fn.get("arguments")
        try:
            args = loads(raw) if isinstance(raw, str) and raw else raw
        except ValueError:
            args = None
        out.append({"function": {"name": fn.get("name"), "arguments": args if isinstance(args, dict) else {}}})
    return out or None


# -- the chat and generate endpoints ----------------------------------------------------------

async def _load_or_unload(request: web.Request, body: dict[str, Any], kind: str) -> web.Response:
    """Ollama's convention: a request with nothing to answer loads the model (or, with
    ``keep_alive: 0``, unloads it), under the same rules as the admin API's."""
    daemon = request.app[DAEMON]
    model = _resolve(request, body)
    ka = body.get("keep_alive")
    try:
        keep_alive = None if ka is None else parse_keep_alive(ka)
    except ValueError as exc:
        raise errors.InvalidRequest(str(exc), param="keep_alive") from None
    if keep_alive == 0:
        await modelops.unload(daemon, request, model, route=True)
    else:
        modelops.check_keep_alive(daemon, request, model, keep_alive)
        await modelops.load(daemon, request, model, route=True)
    done = {"model": body["model"], "created_at": _now(), "done": True,
            "done_reason": "unload" if keep_alive == 0 else "load"}
    done["message" if kind == "chat" else "response"] = {"role": "assistant", "content": ""} if kind == "chat" else ""
    return web.json_response(done, dumps=lambda o: dumpb(o).decode())


class OllamaWriter:
    """Ollama's NDJSON lines (``/api/chat`` and ``/api/generate``), as a ChatFlow ReplyWriter."""

    stream_headers = {"Content-Type": NDJSON}

    def __init__(self, kind: str, model: Any) -> None:
        self.kind, self.model = kind, model

    def _line(self, text: str, thinking: str = "", tool_calls: list[dict[str, Any]] | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.kind == "chat":
            msg: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                msg["thinking"] = thinking
            if tool_calls:
                msg["tool_calls"] = tool_calls
            obj["message"] = msg
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
        if logprobs:  # Ollama's: the entries themselves, beside the message
            obj["logprobs"] = logprobs.get("content") or []
        obj["done"] = False
        return obj

    @staticmethod
    def _thinking(chunk_or_reply: Any) -> str:
        return (chunk_or_reply.extra or {}).get("reasoning_content") or ""

    def _final(self, flow: ChatFlow, text: str, thinking: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        # Tool calls go out whole, at the end, as Ollama sends them (arguments as objects).
        calls = _tool_calls(flow.reply.message().get("tool_calls")) if self.kind == "chat" else None
        obj = self._line(text, thinking, calls, logprobs)
        usage = flow.reply.usage
        total = time.monotonic() - flow.t0
        ttft = (flow.ttft_ms or 0) / 1000
        # Ollama ends a reply with tool calls as "stop".
        reason = "stop" if flow.outcome in (None, "tool_calls") else flow.outcome
        obj.update(done=True, done_reason=reason, total_duration=int(total * 1e9), load_duration=0,
                   prompt_eval_count=usage.prompt_tokens if usage else 0, prompt_eval_duration=int(ttft * 1e9),
                   eval_count=usage.completion_tokens if usage else 0,
                   eval_duration=int(max(0.0, total - ttft) * 1e9))
        if self.kind == "generate" and flow.reply.tokens is not None:
            obj["context"] = flow.reply.tokens  # the prompt's and the reply's tokens, to continue from
        return obj

    def head(self) -> bytes:
        return b""

    def piece(self, chunk: Chunk) -> bytes:
        thinking = self._thinking(chunk)
        if chunk.text or thinking or chunk.logprobs:
            return dumpb(self._line(chunk.text, thinking, logprobs=chunk.logprobs)) + b"\n"
        return b""

    def tail(self, flow: ChatFlow) -> bytes:
        return dumpb(self._final(flow, "", "", None)) + b"\n"

    def error(self, exc: errors.AnyadError) -> bytes:
        return dumpb({"error": exc.message}) + b"\n"  # Ollama reports a failure mid-stream as a line

    def whole(self, flow: ChatFlow) -> bytes:
        reply = flow.reply
        return dumpb(self._final(flow, reply.text, self._thinking(reply), reply.logprobs))


def _resolve(request: web.Request, body: dict[str, Any]) -> str:
    """The model id the request's name stands for, as Ollama resolves names."""
    return ollama_models.door_of(request).resolve(body.get("model") or "")


def _context(body: dict[str, Any]) -> list[int] | None:
    ctx = body.get("context")
    if ctx is None or ctx == []:
        return None
    if not isinstance(ctx, list) or not all(type(t) is int and t >= 0 for t in ctx):
        raise errors.InvalidRequest("context must be a list of token ids, as a reply returned it", param="context")
    return ctx


async def _answer(request: web.Request, body: dict[str, Any], messages: list[dict[str, Any]],
                  kind: str) -> web.StreamResponse:
    check_ollama(body, kind)
    daemon = request.app[DAEMON]
    model = _resolve(request, body)
    chat = parse_chat_request(_openai_body(body, messages, model))
    if kind == "generate":
        context = _context(body)
        local = model in daemon.local
        if context is not None:
            if not local:
                raise errors.InvalidRequest("context: only a local model continues from token ids (its own)",
                                            param="context")
            chat.params.context = context
            chat.body = {**chat.body, "context": context}  # another context is another answer (the cache's key)
        if local:
            chat.params.return_tokens = True  # for the reply's context
    return await _flow(request, chat, kind, body)


async def _flow(request: web.Request, chat: Any, kind: str, body: dict[str, Any]) -> web.StreamResponse:
    flow = ChatFlow(request.app[DAEMON], request, chat)
    opened = await flow.open()
    return await flow.respond(opened, OllamaWriter(kind, body.get("model")))


COMPLETION_FIELDS = ("model", "stream", "max_tokens", "keep_alive", *OPTION_FIELDS.values())


async def _complete(request: web.Request, body: dict[str, Any], prompt: str, suffix: str | None) -> web.StreamResponse:
    """``raw`` and ``suffix``: the prompt continued as it is, with no template (between it
    and the suffix, as fill-in-the-middle), the completions door's way."""
    check_ollama(body, "generate")
    for key, why in (("images", "images go where the chat template puts them"),
                     ("format", "a format is held by the chat template's reply")):
        if body.get(key):
            raise errors.InvalidRequest(f"{key} cannot go with raw or suffix: {why}", param=key)
    base = _openai_body(body, [], _resolve(request, body))
    comp: dict[str, Any] = {k: base[k] for k in COMPLETION_FIELDS if k in base}
    comp["prompt"] = prompt
    comp["max_tokens"] = base.get("max_tokens")  # Ollama's default: up to the end of the context
    if suffix is not None:
        comp["suffix"] = suffix
    if base.get("logprobs"):
        comp["logprobs"] = base.get("top_logprobs") or 0
    return await _flow(request, parse_completion_request(comp), "generate", body)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise errors.InvalidRequest("messages must be a list", param="messages")
    if not messages:
        return await _load_or_unload(request, body, "chat")
    return await _answer(request, body, [_message(m) for m in messages], "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise errors.InvalidRequest("prompt must be a string", param="prompt")
    raw, suffix = body.get("raw"), body.get("suffix")
    if raw not in (None, True, False):
        raise errors.InvalidRequest("raw must be true or false", param="raw")
    if suffix is not None and not isinstance(suffix, str):
        raise errors.InvalidRequest("suffix must be a string", param="suffix")
    suffix = suffix or None
    if not prompt and not body.get("images") and suffix is None:
        return await _load_or_unload(request, body, "generate")
    if raw or suffix is not None:
        return await _complete(request, body, prompt, suffix)
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": str(body["system"])})
    messages.append(_message({"role": "user", "content": prompt, "images": body.get("images")}))
    return await _answer(request, body, messages, "generate")


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise errors.InvalidRequest("model is required", param="model")
    return body


# -- models: tags, ps, show -------------------------------------------------------------------

def _details(backend: Any) -> dict[str, Any]:
    info = getattr(backend, "info", None)
    if info is None:
        return {"format": "", "family": "", "families": None, "parameter_size": "", "quantization_level": ""}
    return {"parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
            "parameter_size": info.size_label or "", "quantization_level": info.quantization or ""}


def _stored(request: web.Request, name: str) -> Any:
    """The store model ``name`` is (its manifest, its Modelfile's defaults), or None."""
    return ollama_models.door_of(request).models.get(name)


def _digest(name: str, backend: Any, stored: Any = None) -> str:
    if stored is not None:
        return stored.manifest.digest  # Ollama's: the manifest's own
    info = getattr(backend, "info", None)
    sha = getattr(getattr(backend, "settings", None), "sha256", None)
    if sha:
        return sha.lower()
    stamp = f"{name}:{info.path}:{info.size_bytes}" if info is not None else name
    return hashlib.sha256(stamp.encode()).hexdigest()


def _entries(daemon: Any) -> list[tuple[str, Any]]:
    """(name, backend or None) for every model the router knows."""
    out: list[tuple[str, Any]] = []
    for m in daemon.router.models():
        backend = daemon.local.get(m.id)
        out.append((m.id, backend))
    return out


def _mtime(path: Any) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


async def tags(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    models = []
    ident = identity(request)
    for name, backend in _entries(daemon):
        if not ident.may_use(name):
            continue
        info = getattr(backend, "info", None)
        stored = _stored(request, name)
        modified = _mtime(stored.path) if stored is not None else \
            info.path.stat().st_mtime if info is not None else daemon.started_at
        size = stored.manifest.size if stored is not None else info.size_bytes if info is not None else 0
        models.append({"name": name, "model": name, "modified_at": _iso(modified), "size": size,
                       "digest": _digest(name, backend, stored), "details": _details(backend)})
    return web.json_response({"models": models})


async def ps(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    models = []
    for m in modelops.loaded(daemon, request):
        backend = daemon.local.get(m.name)
        p = m.placement
        expires = _iso(m.expires_at) if m.expires_at else \
            (FOREVER_ISO if m.keep_alive == float("inf") else _now())
        models.append({"name": m.name, "model": m.name, "size": p.ram_bytes + p.vram_bytes, "size_vram": p.vram_bytes,
                       "digest": _digest(m.name, backend, _stored(request, m.name)), "details": _details(backend),
                       "expires_at": expires,
                       "context_length": getattr(backend, "n_ctx", None)})
    return web.json_response({"models": models})


async def show(request: web.Request) -> web.Response:
    body = await _body(request)
    daemon = request.app[DAEMON]
    name = _resolve(request, body)
    admit(request, name)
    known = {n: b for n, b in _entries(daemon)}
    if name not in known:
        daemon.router.resolve(name)  # a provider/model name is known without being listed
        known[name] = None
    backend = known[name]
    info = getattr(backend, "info", None)
    model_info: dict[str, Any] = {}
    if info is not None:
        arch = info.architecture
        model_info = {"general.architecture": arch, "general.name": info.name,
                      f"{arch}.context_length": info.context_length, f"{arch}.block_count": info.block_count,
                      f"{arch}.embedding_length": info.embedding_length}
    n_ctx = getattr(backend, "n_ctx", None)
    out: dict[str, Any] = {
        "modelfile": f"# served by anyad {anyad.__version__}\nFROM {info.path if info else name}\n",
        "parameters": f"num_ctx {n_ctx}" if n_ctx else "",
        "template": (info.chat_template or "") if info else "",
        "details": _details(backend), "model_info": model_info,
        "capabilities": ["completion", "embedding"] if info is not None else ["completion"],
        "modified_at": _iso(info.path.stat().st_mtime if info else daemon.started_at),
    }
    stored = _stored(request, name)
    if stored is not None:  # what its Modelfile set, as Ollama shows it
        d = stored.defaults
        params = d.params if "num_ctx" in d.params or not n_ctx else {**d.params, "num_ctx": n_ctx}
        out.update(modelfile=f"# served by anyad {anyad.__version__}\n" + ollama_modelfile.render(
                       str(info.path) if info else name, d.params, d.system, d.template, list(d.messages),
                       list(d.license)),
                   parameters=ollama_modelfile.parameters_text(params), modified_at=_iso(_mtime(stored.path)))
        if d.template is not None and d.own_template:
            out["template"] = d.template
        if d.system is not None:
            out["system"] = d.system
        if d.license:
            out["license"] = "\n".join(d.license)
        if d.messages:
            out["messages"] = list(d.messages)
    return web.json_response(out)


# -- embeddings, version, root ----------------------------------------------------------------

async def embed(request: web.Request) -> web.Response:
    body = await _body(request)
    inputs = body.get("input", "")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise errors.InvalidRequest("input must be a string or a list of strings", param="input")
    check_inputs(inputs)
    t0 = time.monotonic()
    options = {"dimensions": body["dimensions"]} if body.get("dimensions") else None
    target, result, _ = await embedflow.embed(request, _resolve(request, body), inputs, options)
    return web.json_response({"model": body["model"], "embeddings": result.vectors,
                              "total_duration": int((time.monotonic() - t0) * 1e9), "load_duration": 0,
                              "prompt_eval_count": result.prompt_tokens},
                             headers={"X-Anyad-Backend": target.name})


async def embeddings(request: web.Request) -> web.Response:
    """The older single-prompt endpoint."""
    body = await _body(request)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise errors.InvalidRequest("prompt must be a string", param="prompt")
    check_inputs([prompt], "prompt")
    target, result, _ = await embedflow.embed(request, _resolve(request, body), [prompt])
    return web.json_response({"embedding": result.vectors[0]}, headers={"X-Anyad-Backend": target.name})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_VERSION}, headers={"X-Anyad-Version": anyad.__version__})


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


# -- the listener -----------------------------------------------------------------------------

def ollama_error_body(exc: errors.AnyadError) -> dict[str, str]:
    """Errors in Ollama's shape: ``{"error": "..."}``, with the status anyad gives them."""
    return {"error": exc.message}


def build_app(daemon: Any, host: str = "127.0.0.1") -> web.Application:
    """The Ollama door on the gateway layer every door shares (keys, Host and Origin,
    rate limits, accounting); ``host``: where it listens."""
    from anyad.api import register_v1_routes, v1_error_bodies

    app = gateway_app(daemon, lambda: host, ollama_error_body, by_path=v1_error_bodies())
    register_v1_routes(app)
    r = app.router
    r.add_get("/", root)
    r.add_get("/api/version", version)
    r.add_get("/api/tags", tags)
    r.add_get("/api/ps", ps)
    r.add_post("/api/show", show)
    r.add_post("/api/chat", chat)
    r.add_post("/api/generate", generate)
    r.add_post("/api/embed", embed)
    r.add_post("/api/embeddings", embeddings)
    ollama_models.register(app)
    return app


# Each daemon's listener (tests run several daemons in one process).
LISTENERS: "weakref.WeakKeyDictionary[Any, tuple[web.AppRunner, tuple[str, int]]]" = weakref.WeakKeyDictionary()


def address(daemon: Any) -> tuple[str, int] | None:
    """Where this daemon's Ollama API listens, once started."""
    entry = LISTENERS.get(daemon)
    return entry[1] if entry else None


@anyad.hookimpl
async def anyad_startup(daemon: Any, config: dict[str, Any]) -> None:
    try:
        settings = OllamaSettings.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise errors.ConfigError(f"plugins.ollama: {err['loc'][0]}: {err['msg'].removeprefix('Value error, ')}") \
            from None
    check_bind(daemon.settings.server.model_copy(update={"host": settings.host}), bool(daemon.settings.keys))
    await ollama_models.start(daemon, settings.registry)  # the store's models served before the door opens
    from anyad.listen import listen

    runner, bound = await listen(build_app(daemon, settings.host), settings.host, settings.port,
                                 daemon.settings.server, label="plugins.ollama: ")
    LISTENERS[daemon] = (runner, bound)
    log.info("Ollama API listening on http://%s:%s", *bound)


@anyad.hookimpl
def anyad_before_request(request: Any, daemon: Any) -> Any:
    """Ollama's names and a store model's Modelfile defaults, on every door (after the
    access check: ``ChatFlow.open`` admits the request first)."""
    return ollama_models.before_request(request, daemon)


@anyad.hookimpl
async def anyad_shutdown(daemon: Any) -> None:
    entry = LISTENERS.pop(daemon, None)
    if entry is not None:
        await entry[0].cleanup()
    ollama_models.DOORS.pop(daemon, None)
