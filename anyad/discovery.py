"""Finding GGUF files people already have: configured directories, Ollama's store,
LM Studio's models folder and the Hugging Face hub cache.

Each file's metadata comes from its GGUF header (read, not loaded). Files that are not
GGUF, not a language model, later parts of a split model, or unreadable are skipped
with the reason logged. A vision projector (an ``mmproj`` GGUF, architecture ``clip``)
is no model of its own: it is paired with the models beside it (the same folder, as LM
Studio and Hugging Face repositories keep them; the same manifest in Ollama's store). Ids: Ollama's own names
(``llama3.2:3b``); the file's stem elsewhere. The first source to claim an id keeps it,
and configured models come before all of them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Iterator

from anyad.config import DiscoverySettings
from anyad.errors import ConfigError
from anyad.gguf_meta import GGUFInfo, read_gguf_info

log = logging.getLogger("anyad.discovery")

SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")
NOT_LANGUAGE_MODELS = {"clip"}  # multimodal projectors ship as GGUF too
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
OLLAMA_DIGEST = re.compile(r"sha256:[0-9A-Za-z]+")  # held whole (fullmatch): no trailing newline


def blob_name(digest: str) -> str:
    """A manifest's digest as its blob's file name, if it is a digest (never a path out of the store)."""
    if not isinstance(digest, str) or not OLLAMA_DIGEST.fullmatch(digest):
        raise ValueError(f"not a digest: {str(digest)[:80]!r}")
    return digest.replace(":", "-")


@dataclass(slots=True)
class Found:
    id: str
    path: Path
    source: str  # directory | ollama | lmstudio | huggingface
    info: GGUFInfo
    mmproj: Path | None = None  # its vision projector, where one was found with it


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def lmstudio_roots() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def huggingface_root() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(hf_home) / "hub"


def _ggufs(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".gguf"):
                yield Path(dirpath) / name


def _stem_id(path: Path) -> str | None:
    """The file's stem, or None for a later part of a split model (the first part stands for it)."""
    stem = path.name[:-5]
    m = SPLIT_PART.search(stem)
    if m:
        if m.group(1) != "00001":
            return None
        stem = stem[: m.start()]
    return stem


def _inspect(path: Path, source: str) -> GGUFInfo | None:
    try:
        info = read_gguf_info(path)
    except ConfigError as exc:
        log.info("discovery (%s): skipping %s: %s", source, path, exc)
        return None
    if info.architecture in NOT_LANGUAGE_MODELS:
        log.info("discovery (%s): skipping %s: a %s file, not a language model", source, path, info.architecture)
        return None
    return info


def _projector(path: Path) -> bool:
    """A vision projector by its name (how converters and hubs name them) or its header."""
    if "mmproj" in path.name.lower():
        return True
    try:
        return read_gguf_info(path).architecture in NOT_LANGUAGE_MODELS
    except ConfigError:
        return False


def _paired(paths: list[Path]) -> dict[Path, Path]:
    """Each folder's projector, for the models in that folder: the one there, or of several
    the one whose name holds the model's stem (else none: which would be a guess)."""
    by_dir: dict[Path, list[Path]] = {}
    for p in paths:
        if _projector(p):
            by_dir.setdefault(p.parent, []).append(p)
    out = {}
    for p in paths:
        projectors = by_dir.get(p.parent, [])
        if p in projectors or not projectors:
            continue
        stem = (_stem_id(p) or "").lower()
        named = [q for q in projectors if stem and stem in q.name.lower()]
        pick = projectors if len(projectors) == 1 else named if len(named) == 1 else []
        if pick:
            out[p] = pick[0]
    return out


def _from_paths(paths: list[Path], source: str, seen: set[str] | None = None) -> Iterator[Found]:
    projectors = _paired(paths)
    for path in paths:
        model_id = _stem_id(path)
        if model_id is None or (seen is not None and model_id in seen):
            continue
        if seen is not None:
            seen.add(model_id)
        info = _inspect(path, source)
        if info is not None:
            yield Found(model_id, path, source, info, projectors.get(path))


def _from_roots(roots: list[Path], source: str) -> Iterator[Found]:
    """Every *.gguf under ``roots``, named by its stem."""
    for root in roots:
        yield from _from_paths(list(_ggufs(root)), source)


def from_directories(dirs: list[Path]) -> Iterator[Found]:
    return _from_roots(dirs, "directory")


def from_lmstudio() -> Iterator[Found]:
    return _from_roots(lmstudio_roots(), "lmstudio")


def from_huggingface() -> Iterator[Found]:
    root = huggingface_root()
    if not root.is_dir():
        return
    for repo in sorted(root.glob("models--*")):
        # Each snapshot links to blobs; the newest snapshot's files are the ones to serve.
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        seen: set[str] = set()
        for snap in snapshots:
            yield from _from_paths(list(_ggufs(snap)), "huggingface", seen)


def ollama_name(manifest: Path, manifests: Path) -> str:
    """The id discovery gives a manifest, Ollama's name for it: ``name:tag`` in the default
    library, else with its namespace (and host, when not the default registry)."""
    host, namespace, *rest = manifest.relative_to(manifests).parts
    name, tag = "/".join(rest[:-1]), rest[-1]
    prefix = "" if namespace == "library" else namespace + "/"
    if host != "registry.ollama.ai":
        prefix = f"{host}/{namespace}/"
    return f"{prefix}{name}:{tag}"


def from_ollama() -> Iterator[Found]:
    import json

    root = ollama_root()
    manifests = root / "manifests"
    if not manifests.is_dir():
        return
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        try:
            name = ollama_name(manifest, manifests)
            data = json.loads(manifest.read_text())
            layers = data.get("layers", [])
            layer = next(layer for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
            # A digest is a file name only once it is one (never a path out of the store).
            blob = root / "blobs" / blob_name(layer["digest"])
            projector = next((root / "blobs" / blob_name(p["digest"]) for p in layers
                              if p.get("mediaType") == OLLAMA_PROJECTOR_LAYER), None)
        except (ValueError, OSError, StopIteration, KeyError, AttributeError, TypeError) as exc:
            log.info("discovery (ollama): skipping %s: not a model manifest (%s)", manifest, type(exc).__name__)
            continue
        info = _inspect(blob, "ollama")
        if info is not None:
            paired = projector if projector is not None and projector.is_file() else None
            yield Found(name, blob, "ollama", info, paired)


def discover(settings: DiscoverySettings, taken: AbstractSet[str] = frozenset()) -> list[Found]:
    """Every model the enabled sources hold, first claim to an id winning (``taken``: the
    configured ones)."""
    sources = {"directories": lambda: from_directories([Path(d).expanduser() for d in settings.directories]),
               "ollama": from_ollama, "lmstudio": from_lmstudio, "huggingface": from_huggingface}
    found: list[Found] = []
    claimed = set(taken)
    for name in settings.sources:
        for f in sources[name]():
            if f.id in claimed:
                log.info("discovery (%s): %s is already a model id; skipping %s", f.source, f.id, f.path)
                continue
            claimed.add(f.id)
            found.append(f)
    return found
