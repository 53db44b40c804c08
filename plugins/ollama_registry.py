"""Pulling a model from an Ollama-style registry into Ollama's store.

The registry is the one configured (``[plugins.ollama] registry = "http://host:port"``);
anyad has no default one and pulls from no other. Its protocol is Ollama's (the OCI
distribution API's shape): ``GET {registry}/v2/{namespace}/{model}/manifests/{tag}``
answers a manifest, ``GET {registry}/v2/{namespace}/{model}/blobs/sha256:<hex>`` each blob.

Each blob is fetched by ``anyad.download.fetch``, the one downloader: into a ``.part``
beside its place in the store, hashed as it arrives, held to the manifest's size, resumed
after an interruption, renamed into place only when its digest and its size are right (a
blob already in the store is never replaced nor removed by a pull). The manifest is written
last, once every blob it names is in the store, so a pull that fails leaves no model half
there (a blob already verified stays, to be reused). A blob's download follows the
registry's redirects as ``anyad.download.fetch`` allows them (a few; to https anywhere or
the registry's own host; never to a loopback or private address unless the registry is on
one).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Any, Callable
from urllib.parse import urlparse

import aiohttp

from anyad import __version__
from anyad.download import DownloadError, fetch
from anyad.errors import BackendError, InvalidRequest, ModelNotFound, NetworkError
from anyad.ollama_store import (
    MANIFEST_TYPE,
    MAX_MANIFEST_BYTES,
    Manifest,
    Name,
    OllamaStore,
    StoreError,
    blob_name,
    check_sizes,
    parse_manifest,
    valid_host,
)
from anyad.tables import size as human_size

Emit = Callable[[dict[str, Any]], None]
TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 0.1  # at most this often per blob, as well as at its start and its end


def check_registry(url: str) -> str:
    """A registry's base URL, as configured: http(s), a host, no query; without a trailing slash."""
    try:
        u = urlparse(url)
        _ = u.port  # a port that is not a number raises here
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment or u.username:
        raise ValueError("registry must be an http:// or https:// URL of an Ollama-style registry, "
                         "e.g. \"http://127.0.0.1:5000\"")
    if not valid_host(registry_host(url)):  # e.g. an IPv6 address: Ollama's names have no place for one
        raise ValueError(f"registry: {registry_host(url)!r} cannot be the host of an Ollama model name (letters, "
                         "digits, '.', '-', '_' and a :port; no IPv6 address): give the registry a host name or an "
                         "IPv4 address")
    return url.rstrip("/")


def registry_host(url: str) -> str:
    """The host a registry's models are named and stored under (``host[:port]``)."""
    return urlparse(url).netloc.lower()


def _model_url(registry: str, name: Name) -> str:
    # Every part was held to Ollama's rules (no '/', '..', '?', '#', '%'): safe in a path as it is.
    return f"{registry}/v2/{name.namespace}/{name.model}"


async def fetch_manifest(registry: str, name: Name) -> Manifest:
    """The manifest of ``name`` from the registry, checked; a 404 for a model it does not have."""
    url = f"{_model_url(registry, name)}/manifests/{name.tag}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
    headers = {"Accept": MANIFEST_TYPE, "User-Agent": f"anyad/{__version__}"}
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status == 404:
                    raise ModelNotFound(f"pull model manifest: the registry has no model {name.namespace}/"
                                        f"{name.model}:{name.tag}", param="model")
                if resp.status >= 400:
                    raise BackendError(f"pull model manifest: the registry answered {resp.status} {resp.reason}")
                if resp.status != 200:
                    raise BackendError(f"pull model manifest: the registry answered {resp.status} (anyad follows "
                                       "no redirects for manifests)")
                raw = b""
                while len(raw) <= MAX_MANIFEST_BYTES:  # a read returns what has arrived: read to the end
                    block = await resp.content.read(MAX_MANIFEST_BYTES + 1 - len(raw))
                    if not block:
                        break
                    raw += block
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise NetworkError(f"pull model manifest: cannot reach the registry {registry}: "
                           f"{exc or type(exc).__name__}") from None
    try:
        manifest = parse_manifest(raw)
        check_sizes(manifest)
    except StoreError as exc:
        raise BackendError(f"pull model manifest: the registry's manifest is not valid: {exc}") from None
    return manifest


async def pull_blobs(store: OllamaStore, registry: str, name: Name, manifest: Manifest, emit: Emit,
                     fetched: set[str] | None = None) -> None:
    """Every blob of ``manifest`` into the store, verified, with Ollama's progress objects;
    ``fetched`` gets the file name of each blob this pull put there."""
    store.blobs_dir.mkdir(parents=True, exist_ok=True)
    missing = [layer for layer in manifest.blobs if not store.has_blob(layer)]
    need = sum(layer.size for layer in missing)
    free = shutil.disk_usage(store.blobs_dir).free
    if need > free:
        raise InvalidRequest(f"not enough disk space in {store.blobs_dir}: the model needs {human_size(need)} more, "
                             f"{human_size(free)} is free")
    for layer in manifest.blobs:
        hexdigest = layer.digest.split(":", 1)[1]
        status = f"pulling {hexdigest[:12]}"
        final = store.blob_path(layer.digest)
        if store.has_blob(layer):
            emit({"status": status, "digest": layer.digest, "total": layer.size, "completed": layer.size})
            continue
        emit({"status": status, "digest": layer.digest, "total": layer.size, "completed": 0})
        last = [time.monotonic()]

        def progress(p: Any, status: str = status, layer: Any = layer, last: list[float] = last) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or p.done >= layer.size:
                last[0] = now
                emit({"status": status, "digest": layer.digest, "total": layer.size, "completed": p.done})

        try:
            # Held to the manifest's size and digest on its .part, before it takes the blob's
            # place: a blob already there (another model's) is never touched by a lie.
            await fetch(f"{_model_url(registry, name)}/blobs/{layer.digest}", final, sha256=hexdigest,
                        progress=progress, size=layer.size, timeout_s=TIMEOUT_S)
        except DownloadError as exc:
            raise BackendError(f"pulling {layer.digest}: {exc}") from None
        if fetched is not None:
            fetched.add(blob_name(layer.digest))
        emit({"status": status, "digest": layer.digest, "total": layer.size, "completed": layer.size})
    emit({"status": "verifying sha256 digest"})
