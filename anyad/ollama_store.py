"""Ollama's own model store, as Ollama lays it out, and Ollama's model names.

::

    <root>/manifests/<host>/<namespace>/<model>/<tag>   a manifest: JSON naming a config and layers by digest
    <root>/blobs/sha256-<hex>                           each blob's bytes, named by their SHA-256

``<root>`` is the directory discovery reads (``anyad.discovery.ollama_root``:
``$OLLAMA_MODELS``, else ``~/.ollama/models``), so Ollama and anyad see the same models.
A name is ``[host/][namespace/]model[:tag]``; the namespace defaults to ``library`` and the
tag to ``latest``, the host to the one the caller stands for. Every name and digest from
outside is held to Ollama's own rules before it becomes a path: no part can be ``..``,
hold a slash or be empty, so a path made from one stays under ``<root>``.

Writes are atomic: a blob gathers in a hidden ``.part`` file beside its place, is hashed as
it is written, and is renamed into place only once its digest is right; a manifest is
written to a temporary file and renamed over the old one. What is written is readable by
others as the umask allows (as Ollama's own files are), so an Ollama service running as
another user can read what anyad put there.

Blobs are removed only when no manifest refers to them: if any file under ``manifests/``
cannot be read as a manifest or named as a model (one being written, or something
else), no blob is removed at all, for it may be one that manifest uses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator

log = logging.getLogger("anyad.ollama")

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_LAYER = "application/vnd.ollama.image.model"
PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
PARAMS_LAYER = "application/vnd.ollama.image.params"
MESSAGES_LAYER = "application/vnd.ollama.image.messages"
LICENSE_LAYER = "application/vnd.ollama.image.license"

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")  # held whole (fullmatch): no trailing newline
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 1 << 20
MAX_LAYERS = 256


class StoreError(ValueError):
    """A name, digest or manifest that breaks Ollama's rules, or a store that cannot be written."""


class Cancelled(Exception):
    """An import stopped because its request went away (nothing of it is kept)."""


# -- names ------------------------------------------------------------------------------------

def _valid_part(kind: str, s: str) -> bool:
    """Ollama's rule for one part of a name (types/model/name.go): a letter, digit or ``_``
    first, then those and ``-`` and ``_``; ``.`` except in a namespace; ``:`` only in a host."""
    if not 1 <= len(s) <= (350 if kind == "host" else 80):
        return False
    if not (s[0].isascii() and (s[0].isalnum() or s[0] == "_")):
        return False
    for c in s[1:]:
        if c.isascii() and (c.isalnum() or c in "_-"):
            continue
        if c == "." and kind != "namespace":
            continue
        if c == ":" and kind == "host":
            continue
        return False
    return True


def valid_host(host: str) -> bool:
    """Whether ``host`` (``host[:port]``) can be the host part of an Ollama name."""
    return _valid_part("host", host)


@dataclass(frozen=True, slots=True)
class Name:
    """A whole Ollama name: every part filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What two names must share to be the same model (Ollama compares names without case)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    def short(self, default_host: str) -> str:
        """The name as Ollama shows it: without the default host, and without the default
        namespace on that host (``llama3:latest``, ``someone/coder:7b``, ``host:5000/ns/m:tag``)."""
        if self.host.lower() != default_host.lower():
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        return f"{self.namespace}/{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def parse_name(name: Any, default_host: str) -> Name:
    """``[host/][namespace/]model[:tag]`` as Ollama reads it (``ParseNameBare``), every part
    checked; raises StoreError saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise StoreError("a model name is required")
    if len(name) > 600 or "@" in name or "\\" in name or any(not c.isprintable() for c in name):
        raise StoreError(f"invalid model name {name[:100]!r}: expected [host/][namespace/]model[:tag]")
    s, tag = name, DEFAULT_TAG
    if s.rfind(":") > s.rfind("/"):
        s, _, tag = s.rpartition(":")
    host, namespace = default_host, DEFAULT_NAMESPACE
    rest, sep, model = s.rpartition("/")
    if sep:
        rest2, sep2, namespace = rest.rpartition("/")
        if sep2:
            host = rest2.split("://", 1)[-1]
    for kind, part in (("host", host), ("namespace", namespace), ("model", model), ("tag", tag)):
        if not _valid_part(kind, part):
            raise StoreError(f"invalid model name {name[:100]!r}: the {kind} {part[:100]!r} is not valid (letters, "
                             "digits, '_' first; then '-', '_' and '.'" + (" and ':'" if kind == "host" else "")
                             + (", no '.'" if kind == "namespace" else "") + ")")
    return Name(host, namespace, model, tag)


def blob_name(digest: Any) -> str:
    """A digest (``sha256:<hex>`` or Ollama's file form ``sha256-<hex>``) as its blob's file name."""
    m = DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if m is None:
        raise StoreError(f"invalid digest {str(digest)[:100]!r}: expected sha256:<64 lowercase hex digits>")
    return f"sha256-{m.group(1)}"


def digest_of(hexdigest: str) -> str:
    return f"sha256:{hexdigest}"


# -- manifests --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Layer:
    media_type: str
    digest: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Manifest:
    raw: bytes
    config: Layer | None
    layers: tuple[Layer, ...]

    @property
    def digest(self) -> str:
        """The manifest's own digest, as Ollama lists it (``/api/tags``)."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def blobs(self) -> tuple[Layer, ...]:
        return ((self.config,) if self.config else ()) + self.layers

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.blobs)

    def layer(self, media_type: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.media_type == media_type), None)


def _layer(obj: Any, where: str) -> Layer:
    if not isinstance(obj, dict):
        raise StoreError(f"the manifest's {where} is not an object")
    media, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media, str) or not 0 < len(media) <= 200:
        raise StoreError(f"the manifest's {where} has no mediaType")
    blob_name(digest)
    assert isinstance(digest, str)  # blob_name accepts nothing else
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise StoreError(f"the manifest's {where} has no valid size")
    return Layer(media, digest, size)


def parse_manifest(raw: bytes) -> Manifest:
    """A manifest's bytes, checked: config and layers with valid digests and sizes."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise StoreError("the manifest is too large")
    try:
        data = json.loads(raw)
    except ValueError:
        raise StoreError("the manifest is not JSON") from None
    if not isinstance(data, dict):
        raise StoreError("the manifest is not a JSON object")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
        raise StoreError("the manifest has no layers")
    config = _layer(data["config"], "config") if data.get("config") is not None else None
    return Manifest(raw, config, tuple(_layer(x, f"layers[{i}]") for i, x in enumerate(layers)))


def check_sizes(manifest: Manifest) -> None:
    """One digest, one size: a manifest that lists a blob twice with two sizes is refused
    (one of them is a lie, and holding a blob in the store to it would throw it away)."""
    sizes: dict[str, int] = {}
    for layer in manifest.blobs:
        seen = sizes.setdefault(blob_name(layer.digest), layer.size)
        if seen != layer.size:
            raise StoreError(f"the manifest lists {layer.digest} twice, with the sizes {seen} and {layer.size}")


def make_manifest(config: Layer, layers: list[Layer]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config.as_dict(),
                       "layers": [layer.as_dict() for layer in layers]}).encode()


# -- the store --------------------------------------------------------------------------------

class OllamaStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifests_dir = root / "manifests"
        self.blobs_dir = root / "blobs"

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / blob_name(digest)

    def manifest_path(self, name: Name) -> Path:
        for kind, part in zip(("host", "namespace", "model", "tag"), name.parts):
            if not _valid_part(kind, part):  # a Name made by hand, not by parse_name
                raise StoreError(f"invalid {kind} {part[:100]!r}")
        path = self.manifests_dir.joinpath(*name.parts)
        if os.path.commonpath([path, self.manifests_dir]) != str(self.manifests_dir):
            raise StoreError(f"invalid model name {name}")
        return path

    def find(self, name: Name) -> Path | None:
        """The manifest file of ``name``: its own path, else one that differs only in case."""
        exact = self.manifest_path(name)
        if exact.is_file():
            return exact
        for other, path in self.names():
            if other.key == name.key:
                return path
        return None

    def read(self, name: Name) -> Manifest | None:
        path = self.find(name)
        return self.read_path(path) if path is not None else None

    @staticmethod
    def read_path(path: Path) -> Manifest | None:
        try:
            return parse_manifest(path.read_bytes())
        except (OSError, StoreError):
            return None

    def _files(self) -> Iterator[tuple[Name | None, Path]]:
        """Every file under ``manifests/``, with its name (None: its path is no model's name)."""
        if not self.manifests_dir.is_dir():
            return
        for path in sorted(self.manifests_dir.rglob("*")):
            if not path.is_file():
                continue
            parts = path.relative_to(self.manifests_dir).parts
            if len(parts) == 4 and all(_valid_part(k, p) for k, p in zip(("host", "namespace", "model", "tag"),
                                                                           parts)):
                yield Name(*parts), path
            else:
                yield None, path

    def names(self) -> Iterator[tuple[Name, Path]]:
        """Every manifest in the store whose path is a valid name."""
        for name, path in self._files():
            if name is not None:
                yield name, path

    def referenced(self, skip: Path | None = None) -> set[str] | None:
        """The blob files the store's manifests (but ``skip``) refer to; None when that cannot
        be told: a file under ``manifests/`` that cannot be read as a manifest or named as a
        model (half-written, unreadable, something else) may refer to any blob."""
        out: set[str] = set()
        try:
            files = list(self._files())
        except OSError as exc:
            log.warning("Ollama store: cannot list %s (%s); no blob is removed", self.manifests_dir, exc)
            return None
        for name, path in files:
            if skip is not None and path == skip:
                continue
            m = self.read_path(path) if name is not None else None
            if m is None:
                log.warning("Ollama store: %s is not a manifest anyad can read%s; no blob is removed while it is "
                            "there", path, "" if name is not None else " (nor a model's name)")
                return None
            out.update(blob_name(layer.digest) for layer in m.blobs)
        return out

    def has_blob(self, layer: Layer) -> bool:
        try:
            return self.blob_path(layer.digest).stat().st_size == layer.size
        except OSError:
            return False

    def write_manifest(self, name: Name, raw: bytes) -> Path:
        """Write (or replace) the manifest of ``name`` at once; every blob it names must be here."""
        m = parse_manifest(raw)
        check_sizes(m)
        missing = [layer.digest for layer in m.blobs if not self.has_blob(layer)]
        if missing:
            raise StoreError(f"the manifest names blobs that are not in the store: {', '.join(missing)}")
        old = self.find(name)
        path = old or self.manifest_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, raw)
        return path

    def remove(self, path: Path, keep: Container[str] = frozenset()) -> list[str]:
        """Remove a manifest, and the blobs no other manifest (nor ``keep``) refers to; the
        blob file names removed. Empty directories it leaves are removed too."""
        m = self.read_path(path)
        path.unlink()
        d = path.parent
        while d != self.manifests_dir and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
        if m is None:
            return []
        return self.prune([blob_name(layer.digest) for layer in m.blobs], keep)

    def prune(self, blobs: Iterable[str], keep: Container[str] = frozenset()) -> list[str]:
        """Remove those of ``blobs`` (blob file names) that no manifest refers to, nor ``keep``
        holds; the ones removed. None at all when the manifests cannot all be read."""
        still = self.referenced()
        if still is None:
            return []
        gone: list[str] = []
        for blob in blobs:
            if blob not in still and blob not in keep and blob not in gone:
                (self.blobs_dir / blob).unlink(missing_ok=True)
                gone.append(blob)
        return gone

    def write_blob(self, data: bytes) -> tuple[str, int]:
        """A small blob (a template, a system prompt, parameters) from its bytes: (digest, size)."""
        digest = digest_of(hashlib.sha256(data).hexdigest())
        final = self.blob_path(digest)
        if not (final.is_file() and final.stat().st_size == len(data)):
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(final, data)
        return digest, len(data)

    def import_file(self, src: Path, progress: Callable[[int, int], None] | None = None,
                    cancel: threading.Event | None = None) -> tuple[str, int, bool]:
        """Copy a file into the store as a blob, hashing it on the way: (digest, size, whether
        the blob is new to the store). Blocking (run it in a thread); the blob appears only
        once whole. ``cancel`` set meanwhile stops it (``Cancelled``), keeping nothing."""
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        total = src.stat().st_size
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.blobs_dir, prefix=".import-", suffix=".part")
        done = 0
        try:
            with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
                for block in iter(lambda: f.read(CHUNK), b""):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"the import of {src.name} was stopped")
                    h.update(block)
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
                publish(out.fileno())
            digest = digest_of(h.hexdigest())
            final = self.blob_path(digest)
            new = not (final.is_file() and final.stat().st_size == done)
            if new:
                os.replace(tmp, final)
            else:
                os.unlink(tmp)  # the store has it already
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, done, new

    def verify_blob(self, path: Path, digest: str) -> bool:
        """Whether the file's bytes hash to ``digest`` (blocking: run it in a thread)."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        return blob_name(digest_of(h.hexdigest())) == blob_name(digest)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    try:  # Linux: read it, for setting it to read it is not safe beside other threads
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(fd: int) -> None:
    """A file from ``mkstemp`` (0600) given the mode a file created the ordinary way gets
    (0666 less the umask), before it is renamed into the store."""
    os.fchmod(fd, 0o666 & ~_umask())


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            publish(f.fileno())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
