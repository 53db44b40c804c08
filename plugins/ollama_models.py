"""The Ollama door's models: Ollama's names, and its store (pull, delete, copy, create,
blob uploads), served by the daemon as they change.

Names resolve as Ollama resolves them: ``llama3``, ``llama3:latest`` and
``library/llama3:latest`` are one model, and so are a configured model ``tiny`` and
``tiny:latest``. The door's default host (what a name without one means) is the
configured registry's ``host[:port]`` (``[plugins.ollama] registry``), else ``localhost``.

The store is Ollama's own (``anyad.ollama_store``, in the folder discovery reads), so
what anyad pulls or creates Ollama sees, and the other way round. At start the door serves
every model of its host in the store (discovery, when on, serves the rest); each change
goes to the daemon at once through ``Daemon.add_local``/``remove_local``, the one way
local models join and leave, so it is listed (``/api/tags``, ``/v1/models``) and can be
chatted with without a restart. Only models in the store can be deleted, copied or
replaced: a model from the config file or another folder is refused by name.

Changing the store is an admin's operation: the access layer's ``ADMIN_PATHS`` refuse the
paths to other keys, and ``admit`` holds each model name to the key's model patterns; what
names no model (uploading or looking up a blob, a create that imports files: uploaded blobs,
a FROM path) needs an admin key with no model patterns at all (``admit_unnamed``: the files
are no model's, so no pattern can admit them).

What changes the store does so under the door's lock, and what is begun under it runs to
its end there even when the client goes away (the lock is held until it has). A name
written again (pull, copy, create) leaves no blob behind that only its old manifest used;
a create that fails, or whose client goes away, stops its import and leaves none of the
blobs it added. A pulled model is checked as a created one is (a GGUF language model, its
PARAMETERs what a request may ask, its load settings servable) before its manifest is
written; a PARAMETER of a manifest already in the store that would not pass is left out,
with a log line. Only anyad's own creates have their ``TEMPLATE`` rendered by anyad
(``own_template``: kept in anyad's data folder by manifest digest, never read from what a
registry sends).

A model's Modelfile defaults (``SYSTEM``, ``MESSAGE``s, sampling ``PARAMETER``s) are
applied to every chat request for it, on every door, before it is routed
(``before_request``, the plugin's ``anyad_before_request``): as Ollama applies them, a
request's own system message and options win.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator, TypeVar

from aiohttp import web
from pydantic import ValidationError

from anyad import errors
from anyad.access import admit, admit_unnamed
from anyad.chatflow import check_caps
from anyad.config import ModelSettings
from anyad.daemon import DAEMON
from anyad.discovery import NOT_LANGUAGE_MODELS, ollama_name, ollama_root
from anyad.errors import ConfigError, InvalidRequest, NotFound
from anyad.gguf_meta import GGUFInfo, read_gguf_info
from anyad.jsoncodec import dumpb
from anyad.ollama_store import (
    ADAPTER_LAYER,
    CONFIG_TYPE,
    LICENSE_LAYER,
    MESSAGES_LAYER,
    MODEL_LAYER,
    PARAMS_LAYER,
    PROJECTOR_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    Layer,
    Manifest,
    Name,
    OllamaStore,
    StoreError,
    atomic_write,
    blob_name,
    digest_of,
    make_manifest,
    parse_name,
    publish,
)
from anyad.plugins import ollama_modelfile as modelfile
from anyad.plugins.ollama_registry import fetch_manifest, pull_blobs, registry_host
from anyad.request_context import actor, read_json
from anyad.stream import ChatRequest

log = logging.getLogger("anyad.ollama")

LOCAL_HOST = "localhost"  # the host of names when no registry is configured
ORIGINS = {"config": "the config file (a [models] table: change it there)", "directory": "a configured models folder",
           "lmstudio": "LM Studio's models folder", "huggingface": "the Hugging Face hub cache"}
NDJSON = "application/x-ndjson"
MAX_TEXT_LAYER = 1 << 20
WEIGHT_LAYERS = (MODEL_LAYER, PROJECTOR_LAYER, ADAPTER_LAYER)
OWN_TEMPLATES = "ollama-own-templates.json"  # in anyad's data folder: the manifests whose TEMPLATE anyad renders
PROGRESS_EVERY_S = 0.1  # a create's copy progress, at most this often (and at its end)
Emit = Callable[[dict[str, Any]], None]
T = TypeVar("T")


class Conflict(InvalidRequest):
    """A name that is already a model from elsewhere (the config file, another folder)."""

    code = "model_exists"


class StoreConflict(errors.AnyadError):
    """The store is not as the operation needs it (a blob missing, a manifest unreadable)."""

    status = 409
    type = "invalid_request_error"
    code = "store_conflict"


@contextlib.contextmanager
def store_errors(doing: str) -> Iterator[None]:
    """The store's failures as the client's errors: a 409 saying what is wrong, a 500 saying
    what could not be written (never a bare internal error)."""
    try:
        yield
    except StoreError as exc:
        raise StoreConflict(f"{doing}: {exc}") from None
    except OSError as exc:
        raise errors.AnyadError(f"{doing}: cannot change Ollama's store: {exc.strerror or exc}") from None


async def unstoppable(aw: Awaitable[T]) -> T:
    """``aw`` run to its end even when the caller is cancelled meanwhile (the cancellation is
    raised after it), so what the caller holds (the store's lock) is held until then."""
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        raise


@dataclass(frozen=True)
class Defaults:
    """What a store model's Modelfile set: applied to each request, which may override it."""

    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, str], ...] = ()
    template: str | None = None  # its template layer, shown by /api/show
    license: tuple[str, ...] = ()
    own_template: bool = False  # a TEMPLATE given at create, which anyad renders

    @property
    def applies(self) -> bool:
        return bool(self.system or self.messages or self.own_template
                    or any(k in modelfile.SAMPLING for k in self.params))


@dataclass
class StoreModel:
    """A model of Ollama's store that the daemon serves."""

    name: Name
    path: Path  # its manifest
    manifest: Manifest
    defaults: Defaults


def _text(store: OllamaStore, layer: Layer | None) -> str | None:
    if layer is None or layer.size > MAX_TEXT_LAYER:
        return None
    try:
        return store.blob_path(layer.digest).read_text(encoding="utf-8", errors="replace")
    except (OSError, StoreError):
        return None


def _json(store: OllamaStore, layer: Layer | None) -> Any:
    text = _text(store, layer)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def read_params(store: OllamaStore, manifest: Manifest) -> dict[str, Any]:
    """A manifest's PARAMETERs, typed and checked as a create's are (InvalidRequest naming
    the first that would not pass)."""
    layer = manifest.layer(PARAMS_LAYER)
    params = _json(store, layer)
    if layer is not None and not isinstance(params, dict):
        raise InvalidRequest("PARAMETER: the model's params layer is not a JSON object", param="parameters")
    typed = {k: modelfile.typed(k, v, "PARAMETER") for k, v in (params or {}).items()}
    modelfile.check_parameters(typed)
    return typed


def read_defaults(store: OllamaStore, manifest: Manifest, own: bool = False) -> Defaults:
    """A manifest's Modelfile defaults, from its layers (what is unreadable is left out, and
    so is each PARAMETER that a create would refuse, with a log line). ``own``: a manifest
    anyad created with a TEMPLATE of its own, which anyad renders."""
    params = _json(store, manifest.layer(PARAMS_LAYER))
    clean: dict[str, Any] = {}
    for k, v in (params if isinstance(params, dict) else {}).items():
        try:
            value = modelfile.typed(k, v, "PARAMETER")
            modelfile.check_parameters({k: value})
            load_settings(Path(os.devnull), None, {k: value})
        except (InvalidRequest, ConfigError) as exc:
            log.warning("Ollama store: leaving out the parameter %r of the manifest %s: %s", k, manifest.digest[:12],
                        getattr(exc, "message", exc))
            continue
        clean[k] = value
    msgs = _json(store, manifest.layer(MESSAGES_LAYER))
    messages = tuple({"role": m["role"], "content": m["content"]} for m in (msgs if isinstance(msgs, list) else [])
                     if isinstance(m, dict) and m.get("role") in modelfile.ROLES and isinstance(m.get("content"), str))
    return Defaults(system=_text(store, manifest.layer(SYSTEM_LAYER)), params=clean, messages=messages,
                    template=_text(store, manifest.layer(TEMPLATE_LAYER)),
                    license=tuple(t for t in (_text(store, x) for x in manifest.layers if x.media_type == LICENSE_LAYER)
                                  if t is not None),
                    own_template=own)


def load_settings(path: Path, mmproj: Path | None, params: dict[str, Any]) -> ModelSettings:
    """A model's settings with its load PARAMETERs (ConfigError: they cannot be served)."""
    load = {dst: params[src] for src, dst in modelfile.LOAD.items() if src in params}
    try:
        return ModelSettings(path=path, mmproj=mmproj, **load)
    except ValidationError as exc:
        raise ConfigError(f"the model's parameters: {exc.errors()[0]['msg']}") from None


def model_settings(store: OllamaStore, manifest: Manifest, params: dict[str, Any]) -> ModelSettings:
    """How the daemon serves a store model: its model blob, its projector, its load PARAMETERs
    (ConfigError: they cannot be; StoreError: there is no model layer)."""
    layer = manifest.layer(MODEL_LAYER)
    if layer is None:
        raise StoreError("the manifest has no model layer")
    projector = manifest.layer(PROJECTOR_LAYER)
    mmproj = store.blob_path(projector.digest) if projector is not None else None
    return load_settings(store.blob_path(layer.digest), mmproj if mmproj is not None and mmproj.is_file() else None,
                         params)


def check_language_model(path: Path) -> GGUFInfo:
    """The GGUF header of a model file; a 400 for anything else (blocking: run it in a thread)."""
    try:
        info = read_gguf_info(path)
    except ConfigError as exc:
        raise InvalidRequest(f"{path.name}: not a GGUF model file: {exc}") from None
    if info.architecture in NOT_LANGUAGE_MODELS:
        raise InvalidRequest(f"{path.name}: a {info.architecture} file (a vision projector), not a language model")
    return info


class Door:
    """The Ollama door's models, for one daemon."""

    def __init__(self, daemon: Any, registry: str | None) -> None:
        self.daemon = daemon
        self.registry = registry
        self.host = registry_host(registry) if registry else LOCAL_HOST
        self.store = OllamaStore(ollama_root())
        self.models: dict[str, StoreModel] = {}
        self.lock = asyncio.Lock()  # the store's manifests and its blobs' references change under it
        self.pulling = asyncio.Lock()  # one pull at a time: two would write the same blob's .part
        # Blob files in the making (counted: two operations may hold one): a delete meanwhile keeps them.
        self.pending: Counter[str] = Counter()
        self.own_path = daemon.settings.resolved_data_dir / OWN_TEMPLATES
        self.own = self._read_own()  # digests of the manifests anyad created with a TEMPLATE it renders

    # -- what the door holds and knows ----------------------------------------------------------

    def hold(self, blobs: Iterable[str]) -> None:
        self.pending.update(blobs)

    def release(self, blobs: Iterable[str]) -> None:
        self.pending.subtract(blobs)
        for b in [b for b, n in self.pending.items() if n <= 0]:
            del self.pending[b]

    def _read_own(self) -> set[str]:
        try:
            data = json.loads(self.own_path.read_bytes())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.warning("Ollama store: cannot read %s (%s): no model's own TEMPLATE is rendered", self.own_path, exc)
            return set()
        found = data.get("manifests") if isinstance(data, dict) else None
        return {d for d in found if isinstance(d, str)} if isinstance(found, list) else set()

    def mark_own(self, digest: str) -> None:
        """Remember a manifest anyad created with its own TEMPLATE (rendered by anyad)."""
        if digest in self.own:
            return
        self.own_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.own_path, json.dumps({"manifests": sorted(self.own | {digest})}).encode())
        self.own.add(digest)

    def defaults(self, manifest: Manifest) -> Defaults:
        return read_defaults(self.store, manifest, own=manifest.digest in self.own)

    # -- names --------------------------------------------------------------------------------

    def parse(self, raw: Any, param: str = "model") -> Name:
        try:
            return parse_name(raw, self.host)
        except StoreError as exc:
            raise InvalidRequest(str(exc), param=param) from None

    def parse_own(self, raw: Any, param: str = "model") -> Name:
        """A name for a model to write into the store: on the door's own host."""
        name = self.parse(raw, param)
        if name.host.lower() != self.host:
            where = f"the configured registry's ({self.registry})" if self.registry else "this machine's (no registry)"
            raise InvalidRequest(f"{param}: {raw!r} names the host {name.host!r}; this door's models are on "
                                 f"{self.host!r}, {where}: name the model without a host", param=param)
        return name

    def lookup_key(self, name: Name) -> str | None:
        """The model (or route) id that Ollama's name ``name`` stands for, if any."""
        for sid, sm in self.models.items():
            if sm.name.key == name.key:
                return sid
        d = self.daemon
        for mid in [*d.local, *d.router.routes]:
            try:
                if parse_name(mid, self.host).key == name.key:
                    return mid
            except StoreError:
                continue
        return None

    def lookup(self, raw: str) -> str | None:
        """The id ``raw`` stands for: itself, else the model Ollama takes it for; None if
        none (a StoreError for a name Ollama would not take)."""
        d = self.daemon
        if raw in d.local or raw in d.router.routes:
            return raw
        return self.lookup_key(parse_name(raw, self.host))

    def resolve(self, raw: Any) -> Any:
        """The id to route ``raw`` to: ``lookup``'s, else ``raw`` as it is (a provider's
        ``provider/model``, or a name the router then says it does not know)."""
        if not isinstance(raw, str) or not raw:
            return raw
        provider, sep, _ = raw.partition("/")
        if sep and provider in self.daemon.router.providers:  # a provider's model: its own name
            return raw
        try:
            return self.lookup(raw) or raw
        except StoreError:
            return raw

    def id_for(self, name: Name) -> str:
        """The id a store model of ``name`` is (or would be) served under."""
        for sid, sm in self.models.items():
            if sm.name.key == name.key:
                return sid
        return name.short(self.host)

    def origin(self, model_id: str) -> str:
        """Where a model that is not the store's comes from, for an error message."""
        d = self.daemon
        if model_id in d.router.routes:
            return "a route of the config file"
        return ORIGINS.get(d.sources.get(model_id, "config"), "elsewhere")

    def claimable(self, name: Name) -> None:
        """Refuse to write ``name`` where it would stand for a model from elsewhere, or where a
        provider's models are (``provider/model``: the router's, whatever the store holds)."""
        d = self.daemon
        short = name.short(self.host)
        first, sep, _ = short.partition("/")
        providers = {p.lower(): p for p in d.router.providers}
        if sep and first.lower() in providers:
            raise Conflict(f"{short!r} is in the namespace of the provider {providers[first.lower()]!r} (its models "
                           f"are {providers[first.lower()]}/<model>): give the new model another name",
                           param="model")
        other = self.lookup_key(name) or (short if short in d.local or short in d.router.routes else None)
        if other is not None and other not in self.models:
            raise Conflict(f"{short!r} is {other!r}, which comes from {self.origin(other)}, not from Ollama's store: "
                           "give the new model another name", param="model")

    # -- serving the store's models -------------------------------------------------------------

    async def start(self) -> None:
        """Serve the store's models of this door's host (under the names this door gives
        them, whether discovery found them first or not); know the others discovery serves."""
        d = self.daemon
        for name, path in self.store.names():
            manifest = self.store.read_path(path)
            if manifest is None:
                continue
            found = ollama_name(path, self.store.manifests_dir)
            discovered = d.sources.get(found) == "ollama" and found in d.local
            if name.host.lower() == self.host:
                model_id = self.id_for(name)
                if discovered and (found == model_id or model_id in d.local):
                    self.models[found] = StoreModel(name, path, manifest, self.defaults(manifest))
                    continue
                if discovered:
                    await d.remove_local(found, why=f"served as {model_id}")
                try:
                    self._add(model_id, name, path, manifest)
                except (ConfigError, StoreError) as exc:
                    log.warning("Ollama store: not serving %s: %s", name.short(self.host), exc)
            elif discovered:
                self.models[found] = StoreModel(name, path, manifest, self.defaults(manifest))
        if self.models:
            log.info("Ollama store %s: serving %s", self.store.root, ", ".join(self.models))

    def _add(self, model_id: str, name: Name, path: Path, manifest: Manifest) -> None:
        defaults = self.defaults(manifest)
        ms = model_settings(self.store, manifest, defaults.params)
        if model_id in self.daemon.local:
            raise ConfigError(f"{model_id!r} is already a model id")
        self.daemon.add_local(model_id, ms, "ollama")
        self.models[model_id] = StoreModel(name, path, manifest, defaults)

    async def serve(self, name: Name, path: Path) -> str:
        """(Re)serve the store's model ``name`` from its manifest now; its id."""
        manifest = self.store.read_path(path)
        if manifest is None:
            raise StoreError(f"cannot read the manifest {path}")
        model_id = self.id_for(name)
        old = self.models.get(model_id)
        if old is not None and model_id in self.daemon.local:
            if old.manifest.raw == manifest.raw and old.path == path:
                return model_id
            await self.daemon.remove_local(model_id, why="replaced in Ollama's store")
        self.models.pop(model_id, None)
        try:
            self._add(model_id, name, path, manifest)
        except (ConfigError, StoreError) as exc:
            raise InvalidRequest(f"{name.short(self.host)}: written to Ollama's store, but it cannot be served: "
                                 f"{exc}") from None
        return model_id

    async def commit(self, name: Name, raw: bytes) -> str:
        """Write ``name``'s manifest and serve it (the caller holds the lock); the blobs only
        its old manifest used are removed once the new one is served. Its id."""
        short = name.short(self.host)
        with store_errors(f"writing {short}"):
            old = self.store.read(name)
            path = self.store.write_manifest(name, raw)

        async def finish() -> str:
            served = await self.serve(name, path)
            if old is not None and old.raw != raw:
                self.prune(old.blobs, f"{short}'s old manifest")
            return served

        return await unstoppable(finish())

    def prune(self, layers: Iterable[Layer | str], whose: str) -> list[str]:
        """Remove the blobs of ``layers`` (or blob file names) that no manifest uses and no
        operation holds (the caller holds the lock)."""
        blobs = [x if isinstance(x, str) else blob_name(x.digest) for x in layers]
        try:
            gone = self.store.prune(blobs, keep=self.pending)
        except OSError as exc:
            log.warning("Ollama store: cannot remove the blobs of %s: %s", whose, exc)
            return []
        if gone:
            log.info("Ollama store: removed %d blob(s) of %s that no model uses", len(gone), whose)
        return gone

    async def unserve(self, model_id: str) -> None:
        self.models.pop(model_id, None)
        if model_id in self.daemon.local:
            await self.daemon.remove_local(model_id, why="deleted from Ollama's store")

    def audit(self, request: web.Request, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        if self.daemon.audit is not None:
            self.daemon.audit.action(actor(request), action, target, detail)


# Each daemon's door (tests run several daemons in one process).
DOORS: "weakref.WeakKeyDictionary[Any, Door]" = weakref.WeakKeyDictionary()


def door_of(request: web.Request) -> Door:
    door = DOORS.get(request.app[DAEMON])
    if door is None:  # pragma: no cover - the listener starts after its door
        raise errors.Unavailable("the Ollama door is not started")
    return door


async def start(daemon: Any, registry: str | None) -> Door:
    door = DOORS[daemon] = Door(daemon, registry)
    await door.start()
    return door


# -- the request hook: names and Modelfile defaults on every door --------------------------------

def before_request(chat: ChatRequest, daemon: Any) -> ChatRequest | None:
    """A chat request for an Ollama name goes to the model it stands for, with its
    Modelfile's defaults (the request's own system message and options win)."""
    door = DOORS.get(daemon)
    if door is None:
        return None
    changed = False
    if chat.model not in daemon.local and chat.model not in daemon.router.routes:
        found = door.resolve(chat.model)
        if found != chat.model:
            chat = replace(chat, model=found, body={**chat.body, "model": found})
            changed = True
    sm = door.models.get(chat.model)
    if sm is None or not sm.defaults.applies:
        return chat if changed else None
    server = daemon.settings.server
    out = apply_defaults(chat, sm.defaults, max_chars=2 * server.max_prompt_chars)
    if out.raw and not chat.raw:  # its own TEMPLATE rendered the prompt: held to what any request is
        check_caps(out, server)
    return out


def apply_defaults(chat: ChatRequest, d: Defaults, max_chars: int | None = None) -> ChatRequest:
    """``chat`` with the defaults it does not set itself, in its parameters and in its body
    (which the response cache keys on: another model's defaults are another answer).
    ``max_chars``: the most an own TEMPLATE may render (a TemplateError's 400 past it)."""
    body = dict(chat.body)
    params = replace(chat.params)
    for option, dst in modelfile.SAMPLING.items():
        if option not in d.params:
            continue
        value = d.params[option]
        if dst == "max_tokens":
            if value <= 0 or "max_tokens" in chat.body or "max_completion_tokens" in chat.body:
                continue
        elif chat.body.get(dst) not in (None, []):
            continue
        body[dst] = value
        setattr(params, dst, list(value) if isinstance(value, list) else value)
    messages = chat.messages
    if not chat.raw:
        ours = [dict(m) for m in d.messages]
        if d.system and not (messages and messages[0].get("role") == "system"):
            ours.insert(0, {"role": "system", "content": d.system})
        if ours:
            messages = [*ours, *messages]
            body["messages"] = messages
        if d.own_template and d.template is not None:
            from anyad.plugins.ollama_template import MAX_CHARS, templated

            return templated(replace(chat, messages=messages, params=params, body=body), d.template,
                             max_chars=max_chars or MAX_CHARS)
    return replace(chat, messages=messages, params=params, body=body)


# -- replies: Ollama's progress objects ----------------------------------------------------------

async def progress_reply(request: web.Request, stream: bool,
                         work: Callable[[Emit], Awaitable[None]]) -> web.StreamResponse:
    """``work``'s progress objects as NDJSON lines (a failure as an ``{"error"}`` line), or
    with ``stream: false`` its last object alone (a failure as the HTTP error). A client
    that goes away stops the work (a pull resumes from its ``.part`` files next time)."""
    if not stream:
        last: dict[str, Any] = {}

        def keep(ev: dict[str, Any]) -> None:
            last.clear()
            last.update(ev)

        await work(keep)
        return web.json_response(last, dumps=lambda o: dumpb(o).decode())
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()

    async def run() -> None:
        try:
            await work(queue.put_nowait)
        except errors.AnyadError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # a bug: the client gets a line, the log the traceback
            log.exception("Ollama door: %s failed", request.path)
            queue.put_nowait(errors.AnyadError(f"{request.path} failed: {type(exc).__name__}"))
        finally:
            queue.put_nowait(done)

    task = asyncio.create_task(run())
    resp = web.StreamResponse(headers={"Content-Type": NDJSON})
    try:
        await resp.prepare(request)
        while (item := await queue.get()) is not done:
            line = {"error": item.message} if isinstance(item, errors.AnyadError) else item
            await resp.write(dumpb(line) + b"\n")
    except ConnectionError:
        log.info("Ollama door: the client of %s went away", request.path)
    finally:
        if not task.done():
            task.cancel()
    return resp


async def _object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _model_field(body: dict[str, Any], key: str = "model") -> str:
    value = body.get(key) or (body.get("name") if key == "model" else None)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key} is required", param=key)
    return value


def _not_found(raw: str) -> NotFound:
    return errors.ModelNotFound(f"model '{raw[:200]}' not found", param="model")


def _store_model(door: Door, request: web.Request, raw: str, doing: str) -> tuple[str, StoreModel]:
    """The store model ``raw`` names, the request's key allowed to use it; 404 for none,
    400 for a model that is not in the store."""
    try:
        model_id = door.lookup(raw)
    except StoreError as exc:
        raise InvalidRequest(str(exc), param="model") from None
    if model_id is None:
        raise _not_found(raw)
    admit(request, model_id)
    sm = door.models.get(model_id)
    if sm is None:
        raise InvalidRequest(f"cannot {doing} {model_id!r}: it comes from {door.origin(model_id)}, not from Ollama's "
                             f"store; this door can {doing} only the store's models", param="model",
                             code="model_not_managed")
    return model_id, sm


# -- pull ---------------------------------------------------------------------------------------

async def check_pulled(door: Door, raw: str, manifest: Manifest) -> None:
    """A pulled model, its blobs in the store, checked as a created one is before its
    manifest is written: a GGUF language model, PARAMETERs a create would take, servable."""
    model = manifest.layer(MODEL_LAYER)
    if model is None:
        raise InvalidRequest(f"{raw}: the registry's manifest has no model layer; nothing was written")
    await asyncio.to_thread(check_language_model, door.store.blob_path(model.digest))
    try:
        model_settings(door.store, manifest, read_params(door.store, manifest))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{raw}: the registry's model cannot be served here: {exc.message}; nothing was "
                             "written", param=exc.param) from None
    except (ConfigError, StoreError) as exc:
        raise InvalidRequest(f"{raw}: the registry's model cannot be served here: {exc}; nothing was written",
                             param="model") from None


async def pull(request: web.Request) -> web.StreamResponse:
    door = door_of(request)
    body = await _object(request)
    raw = _model_field(body)
    if door.registry is None:
        raise InvalidRequest("no registry is configured to pull from: set [plugins.ollama] registry = "
                             "\"http://HOST:PORT\" (an Ollama-style registry) in anyad's config", param="model",
                             code="no_registry")
    registry = door.registry
    name = door.parse_own(raw)
    model_id = door.id_for(name)
    admit(request, model_id)
    door.claimable(name)
    manifest = await fetch_manifest(registry, name)  # before the stream: its failures get their status
    blobs = {blob_name(layer.digest) for layer in manifest.blobs}

    async def work(emit: Emit) -> None:
        emit({"status": "pulling manifest"})
        async with door.pulling:
            door.hold(blobs)
            held = True
            fetched: set[str] = set()  # the blobs this pull put in the store
            try:
                await pull_blobs(door.store, registry, name, manifest, emit, fetched)
                try:
                    await check_pulled(door, raw, manifest)
                except errors.AnyadError:  # not a model anyad can serve: none of it stays
                    door.release(blobs)
                    held = False
                    async with door.lock:
                        door.prune(fetched, f"the refused pull of {raw}")
                    raise
                emit({"status": "writing manifest"})
                async with door.lock:
                    served = await door.commit(name, manifest.raw)
            finally:
                if held:
                    door.release(blobs)
        door.audit(request, "ollama.pull", served, {"registry": door.registry, "digest": manifest.digest})
        log.info("pulled %s from %s", served, door.registry)
        emit({"status": "success"})

    return await progress_reply(request, body.get("stream", True) is not False, work)


# -- delete and copy ----------------------------------------------------------------------------

async def delete(request: web.Request) -> web.Response:
    door = door_of(request)
    body = await _object(request)
    raw = _model_field(body)
    try:
        found = door.lookup(raw)
    except StoreError as exc:
        raise InvalidRequest(str(exc), param="model") from None
    path: Path | None
    if found is None:  # not served (say, a manifest it cannot serve): the store's own, if it has it
        name = door.parse(raw)
        with store_errors(f"delete {raw[:200]}"):
            path = door.store.find(name)
        if path is None:
            raise _not_found(raw)
        model_id = door.id_for(name)
        admit(request, model_id)
    else:
        model_id, sm = _store_model(door, request, raw, "delete")
        path = sm.path
    async with door.lock:
        gone: list[str] = []
        with store_errors(f"delete {model_id}"):
            if path.is_file():
                gone = door.store.remove(path, keep=door.pending)
        await unstoppable(door.unserve(model_id))
    door.audit(request, "ollama.delete", model_id, {"blobs_removed": len(gone)})
    log.info("deleted %s from Ollama's store (%d blob(s) no other model uses)", model_id, len(gone))
    return web.json_response(None)


async def copy(request: web.Request) -> web.Response:
    door = door_of(request)
    body = await _object(request)
    source = _model_field(body, "source")
    src_id, sm = _store_model(door, request, source, "copy")
    dest = door.parse_own(_model_field(body, "destination"), "destination")
    dest_id = door.id_for(dest)
    admit(request, dest_id)
    door.claimable(dest)
    async with door.lock:
        with store_errors(f"copy {src_id}"):
            raw = sm.path.read_bytes() if sm.path.is_file() else sm.manifest.raw
        served = await door.commit(dest, raw)
    door.audit(request, "ollama.copy", served, {"source": src_id})
    return web.json_response(None)


# -- create -------------------------------------------------------------------------------------

@dataclass
class Base:
    """What a created model is made from: layers already in the store, and files to add."""

    layers: list[Layer] = field(default_factory=list)
    files: list[tuple[Path, str]] = field(default_factory=list)  # (file, its layer's media type)
    defaults: Defaults = field(default_factory=Defaults)


PATH_PREFIXES = ("/", "~", "./", "../", ".\\")


def _from_path(text: str) -> Path:
    """A FROM path: an absolute path to a GGUF file on this machine."""
    if text.startswith(("./", "../", ".\\")) or not text.startswith(("/", "~")):
        raise InvalidRequest(f"FROM {text[:200]}: a file must be named by its absolute path on this machine (the "
                             "daemon's working directory is not the client's)", param="from")
    if any(part == ".." for part in Path(text).parts):
        raise InvalidRequest(f"FROM {text[:200]}: no '..' in the path", param="from")
    path = Path(text).expanduser()
    try:
        st = path.stat()
    except OSError as exc:
        raise InvalidRequest(f"FROM {text[:200]}: {exc.strerror or exc}", param="from") from None
    if path.is_dir():
        raise InvalidRequest(f"FROM {text[:200]}: a directory; anyad creates models from one GGUF file (it does not "
                             "convert safetensors)", param="from")
    if not path.is_file() or st.st_size == 0:
        raise InvalidRequest(f"FROM {text[:200]}: not a regular file", param="from")
    return path


async def _base(door: Door, request: web.Request, mf: modelfile.Modelfile, files: Any) -> Base:
    """The created model's weights: ``files`` (blobs uploaded to /api/blobs), a GGUF path,
    or an existing model (a store model's layers and defaults; another local model's file)."""
    store = door.store
    if files:
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise InvalidRequest("files must map file names to digests", param="files")
        base = Base()
        for fname, digest in files.items():
            try:
                blob = store.blob_path(digest)
            except StoreError as exc:
                raise InvalidRequest(f"files[{fname[:80]!r}]: {exc}", param="files") from None
            if not blob.is_file():
                raise InvalidRequest(f"files[{fname[:80]!r}]: no blob {digest}: upload it first (POST "
                                     f"/api/blobs/{digest})", param="files")
            try:
                info = await asyncio.to_thread(read_gguf_info, blob)
            except ConfigError:
                raise InvalidRequest(f"files[{fname[:80]!r}]: not a GGUF file (anyad creates models from GGUF files "
                                     "only; it does not convert safetensors)", param="files") from None
            media = PROJECTOR_LAYER if info.architecture in NOT_LANGUAGE_MODELS else MODEL_LAYER
            base.layers.append(Layer(media, digest, blob.stat().st_size))
        if sum(1 for x in base.layers if x.media_type == MODEL_LAYER) != 1:
            raise InvalidRequest("files must hold exactly one GGUF language model", param="files")
        return base
    text = mf.from_ or ""
    if text.startswith(PATH_PREFIXES):
        path = _from_path(text)
        await asyncio.to_thread(check_language_model, path)
        return Base(files=[(path, MODEL_LAYER)])
    try:
        found = door.lookup(text)
    except StoreError as exc:
        raise InvalidRequest(f"FROM {text[:200]}: neither a model name nor an absolute path ({exc})",
                             param="from") from None
    if found is None:
        raise errors.ModelNotFound(f"FROM {text[:200]}: no such model (pull it first), and not an absolute path to "
                                   "a GGUF file", param="from")
    admit(request, found)
    sm = door.models.get(found)
    if sm is not None:
        manifest = store.read_path(sm.path) or sm.manifest
        return Base(layers=[x for x in manifest.layers if x.media_type in WEIGHT_LAYERS],
                    defaults=door.defaults(manifest))
    backend = door.daemon.local.get(found)
    gguf = getattr(backend, "info", None)
    if gguf is None:
        raise InvalidRequest(f"FROM {text[:200]}: {found!r} is not a local model with a GGUF file (a route or a "
                             "remote provider's model cannot be a model's base)", param="from")
    base = Base(files=[(Path(gguf.path), MODEL_LAYER)])
    if getattr(backend, "mmproj", None) is not None:
        base.files.append((Path(backend.mmproj), PROJECTOR_LAYER))
    return base


def _merge(base: Defaults, mf: modelfile.Modelfile) -> Defaults:
    params = dict(base.params)
    params.update(mf.parameters)
    return Defaults(system=mf.system if mf.system is not None else base.system, params=params,
                    messages=tuple(mf.messages) if mf.messages else base.messages,
                    template=mf.template if mf.template is not None else base.template,
                    license=tuple(mf.license) if mf.license else base.license,
                    own_template=mf.template is not None or base.own_template)


async def _import(store: OllamaStore, path: Path, progress: Callable[[int, int], None],
                  fresh: set[str]) -> tuple[str, int]:
    """``store.import_file`` in a thread, stopped when the request is (its copy stops at its
    next block, and keeps nothing); a new blob's file name goes into ``fresh``."""
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(store.import_file, path, progress, cancel))
    try:
        digest, size, new = await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        if not task.cancelled() and task.exception() is None and task.result()[2]:
            fresh.add(blob_name(task.result()[0]))  # it finished first: the caller removes it
        raise
    if new:
        fresh.add(blob_name(digest))
    return digest, size


async def create(request: web.Request) -> web.StreamResponse:
    door = door_of(request)
    body = await _object(request)
    name = door.parse_own(_model_field(body))
    model_id = door.id_for(name)
    admit(request, model_id)
    door.claimable(name)
    if body.get("quantize"):
        raise InvalidRequest("quantize: anyad does not quantize models; create from a GGUF file quantized already",
                             param="quantize")
    if body.get("path") is not None:
        raise InvalidRequest("path: a Modelfile on the server's disk (Ollama's deprecated `path`) is not read; send "
                             "its text as `modelfile`", param="path")
    mf = modelfile.from_request(body)
    if mf.adapters:
        raise InvalidRequest("ADAPTER: LoRA adapters are not supported", param="adapters")
    files = body.get("files")
    if files and mf.from_ is not None:
        raise InvalidRequest("files and FROM (`from`, or a Modelfile's FROM) both name the model's weights: give "
                             "one of them", param="files")
    if mf.from_ is None and not files:
        raise InvalidRequest("FROM is required: a model name, or the absolute path to a GGUF file on this machine "
                             "(`from`, a Modelfile's FROM, or uploaded `files`)", param="from")
    if files or (mf.from_ or "").startswith(PATH_PREFIXES):
        admit_unnamed(request, f"creating a model from {'uploaded blobs' if files else 'a file on this machine'}")
    base = await _base(door, request, mf, files)
    defaults = _merge(base.defaults, mf)
    modelfile.check_parameters(defaults.params)
    if mf.template is not None:
        from anyad.plugins.ollama_template import TemplateError, compile_template

        try:
            compile_template(mf.template)
        except TemplateError as exc:
            raise InvalidRequest(f"TEMPLATE: {exc}", param="template") from None
    store = door.store

    async def work(emit: Emit) -> None:
        mine: list[str] = []  # the blobs this create holds until its manifest is written
        fresh: set[str] = set()  # the blobs it added to the store: removed again if it fails

        def hold(digest: str) -> None:
            mine.append(blob_name(digest))
            door.hold([blob_name(digest)])

        async with door.lock:
            layers = list(base.layers)
            for x in layers:
                hold(x.digest)
            try:
                loop = asyncio.get_running_loop()
                for path, media in base.files:
                    emit({"status": f"copying file {path.name}"})
                    last = [0.0]

                    def progress(done: int, total: int, path: Path = path, last: list[float] = last) -> None:
                        now = time.monotonic()
                        if now - last[0] >= PROGRESS_EVERY_S or done >= total:
                            last[0] = now
                            loop.call_soon_threadsafe(emit, {"status": f"copying file {path.name}",
                                                             "total": total, "completed": done})

                    with store_errors(f"copying {path.name} into the store"):
                        digest, size = await _import(store, path, progress, fresh)
                    hold(digest)
                    layers.append(Layer(media, digest, size))
                    emit({"status": f"creating new layer {digest}"})
                model = next(x for x in layers if x.media_type == MODEL_LAYER)
                info = await asyncio.to_thread(check_language_model, store.blob_path(model.digest))
                emit({"status": "parsing GGUF"})
                texts: list[tuple[str, bytes]] = []
                if defaults.template is not None:
                    texts.append((TEMPLATE_LAYER, defaults.template.encode()))
                if defaults.system is not None:
                    texts.append((SYSTEM_LAYER, defaults.system.encode()))
                if defaults.params:
                    texts.append((PARAMS_LAYER, json.dumps(defaults.params).encode()))
                if defaults.messages:
                    texts.append((MESSAGES_LAYER, json.dumps(list(defaults.messages)).encode()))
                texts += [(LICENSE_LAYER, text.encode()) for text in defaults.license]
                config: dict[str, Any] = {"model_format": "gguf", "model_family": info.architecture,
                                          "model_families": [info.architecture],
                                          "model_type": info.size_label or "", "file_type": info.quantization or ""}

                def add_blob(data: bytes) -> tuple[str, int, bool]:
                    digest = digest_of(hashlib.sha256(data).hexdigest())
                    had = store.has_blob(Layer("", digest, len(data)))
                    with store_errors("writing a layer into the store"):
                        digest, size = store.write_blob(data)
                    if not had:
                        fresh.add(blob_name(digest))
                    hold(digest)
                    return digest, size, had

                for media, data in texts:
                    digest, size, had = add_blob(data)
                    layers.append(Layer(media, digest, size))
                    emit({"status": f"{'using existing' if had else 'creating new'} layer {digest}"})
                for x in base.layers:
                    emit({"status": f"using existing layer {x.digest}"})
                config["rootfs"] = {"type": "layers", "diff_ids": [x.digest for x in layers]}
                digest, size, _ = add_blob(json.dumps(config).encode())
                emit({"status": "writing manifest"})
                raw = make_manifest(Layer(CONFIG_TYPE, digest, size), layers)
                if defaults.own_template:  # a TEMPLATE given here: anyad renders it (anyad's record, not the config's)
                    with store_errors("recording the model's own TEMPLATE"):
                        door.mark_own(hashlib.sha256(raw).hexdigest())
                served = await door.commit(name, raw)
            except BaseException:
                # Failed, or its client went away: none of what it added stays (unless a
                # manifest uses it: one written before the failure keeps its blobs).
                door.release(mine)
                mine.clear()
                door.prune(fresh, f"the unfinished create of {name.short(door.host)}")
                raise
            finally:
                door.release(mine)
        door.audit(request, "ollama.create", served, {"from": mf.from_ or "files"})
        emit({"status": "success"})

    return await progress_reply(request, body.get("stream", True) is not False, work)


# -- blob uploads (what `ollama create` sends a local file as) ------------------------------------

def _blob(door: Door, request: web.Request) -> tuple[str, Path]:
    digest = request.match_info["digest"]
    try:
        return digest, door.store.blob_path(digest)
    except StoreError as exc:
        raise InvalidRequest(str(exc), param="digest") from None


async def blob_head(request: web.Request) -> web.Response:
    admit_unnamed(request, "looking up a blob")  # which files the store holds: no model's either
    _, path = _blob(door_of(request), request)
    if not path.is_file():
        raise NotFound("blob not found")
    return web.Response(status=200)


async def blob_upload(request: web.Request) -> web.Response:
    admit_unnamed(request, "uploading a blob")
    door = door_of(request)
    digest, final = _blob(door, request)
    store = door.store
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store.blobs_dir, prefix=".upload-", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            async for block in request.content.iter_chunked(1 << 20):
                h.update(block)
                f.write(block)
            publish(f.fileno())
        if blob_name(digest_of(h.hexdigest())) != final.name:
            raise InvalidRequest(f"digest mismatch: the upload's SHA-256 is {h.hexdigest()}, not {digest}; nothing "
                                 "was kept", param="digest", code="digest_mismatch")
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return web.Response(status=201)


def register(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/pull", pull)
    r.add_delete("/api/delete", delete)
    r.add_post("/api/copy", copy)
    r.add_post("/api/create", create)
    r.add_route("HEAD", "/api/blobs/{digest}", blob_head)
    r.add_post("/api/blobs/{digest}", blob_upload)
