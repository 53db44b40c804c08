"""Finding GGUF files people already have: configured directories, Ollama's store,
LM Studio's models folder and the Hugging Face hub cache.

Each file's metadata comes from its GGUF header (read, not loaded). Files that are not
GGUF, not a language model (vision projectors), later parts of a split model, or
unreadable are skipped with the reason logged. Ids: Ollama's own names
(``llama3.2:3b``); the file's stem elsewhere. The first source to claim an id keeps it,
and configured models come before all of them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from anyad.config import DiscoverySettings
from anyad.errors import ConfigError
from anyad.gguf_meta import GGUFInfo, read_gguf_info

log = logging.getLogger("anyad.discovery")

SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")
NOT_LANGUAGE_MODELS = {"clip"}  # multimodal projectors ship as GGUF too
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(slots=True)
class Found:
    id: str
    path: Path
    source: str  # directory | ollama | lmstudio | huggingface
    info: GGUFInfo


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


def _from_roots(roots: list[Path], source: str) -> Iterator[Found]:
    """Every *.gguf under ``roots``, named by its stem."""
    for root in roots:
        for path in _ggufs(root):
            model_id = _stem_id(path)
            if model_id is None:
                continue
            info = _inspect(path, source)
            if info is not None:
                yield Found(model_id, path, source, info)


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
            for path in _ggufs(snap):
                model_id = _stem_id(path)
                if model_id is None or model_id in seen:
                    continue
                seen.add(model_id)
                info = _inspect(path, "huggingface")
                if info is not None:
                    yield Found(model_id, path, "huggingface", info)


def _ollama_name(manifest: Path, manifests: Path) -> str:
    """Ollama's name for a manifest: ``name:tag`` in the default library, else with its
    namespace (and host, when not the default registry)."""
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
            name = _ollama_name(manifest, manifests)
            data = json.loads(manifest.read_text())
            layer = next(layer for layer in data.get("layers", []) if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
            blob = root / "blobs" / layer["digest"].replace(":", "-")
        except (ValueError, OSError, StopIteration, KeyError, AttributeError) as exc:
            log.info("discovery (ollama): skipping %s: not a model manifest (%s)", manifest, type(exc).__name__)
            continue
        info = _inspect(blob, "ollama")
        if info is not None:
            yield Found(name, blob, "ollama", info)


def discover(settings: DiscoverySettings, taken: set[str] = frozenset()) -> list[Found]:
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
