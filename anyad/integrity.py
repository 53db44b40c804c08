"""Model files checked against the SHA-256 their config entry gives.

Hashing a large file takes minutes, so a result is remembered by path, size and
modification time (``model-hashes.json`` in ``$XDG_CACHE_HOME/anyad``, a cache that can
be deleted at any time): a restart, or a second model entry for the same file, does not
hash it again, and a changed file is hashed anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from anyad.errors import Unavailable

HASHES_FILE = "model-hashes.json"
_lock = threading.Lock()


class ModelIntegrityError(Unavailable):
    code = "model_integrity"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anyad"


def file_sha256(path: Path, data_dir: Path | None = None) -> str:
    """The file's SHA-256, from the remembered results when the file has not changed."""
    st = path.stat()
    key = str(path.resolve())
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    data_dir = data_dir or cache_dir()
    store = data_dir / HASHES_FILE
    with _lock:
        known = _read(store)
        entry = known.get(key)
        if entry and {k: entry.get(k) for k in stamp} == stamp:
            return entry["sha256"]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * 2 ** 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        known = _read(store)
        known[key] = {**stamp, "sha256": digest}
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, store)  # whole or not at all
    return digest


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def verify(model_id: str, path: Path, expected: str, data_dir: Path | None = None) -> None:
    """Raise ModelIntegrityError, giving both hashes, unless the file is what the config says."""
    actual = file_sha256(path, data_dir)
    if actual != expected.lower():
        raise ModelIntegrityError(f"model {model_id!r}: {path} does not match its sha256: expected {expected.lower()}, "
                                  f"the file has {actual}; the model is refused")
