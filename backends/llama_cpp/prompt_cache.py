"""Saved conversation states of one model: a RAM tier and a disk tier, found by prefix.

When the batched context must give a slot to another conversation, the state of the
conversation it held (its KV cells, from ``llama_state_seq_get_data``) is kept here,
under the tokens it covers; when a prompt comes that continues it, the state is put back
into a slot (``llama_state_seq_set_data``) and only the rest of the prompt is read, as
llama-server's host-memory prompt cache does. Beyond llama-server's, states also go to
disk (when the RAM tier evicts one, and for every slot when the model unloads), so that
a conversation survives an unload, a reload and a daemon restart.

A state is only ever served to the model file it was made from: the disk tier lives in
a folder named for the model's identity (its resolved path, size, modification time, the
first MiB of its contents, the KV cache type and llama.cpp's state format), and each
file repeats that identity in its header, checked on every read. Both tiers are
size-capped, least recently used first out.

Disk writes happen on a thread of their own, so that a large state going to disk never
stalls the streams being decoded; until its file is written, an entry is served from
memory. Reads from disk are the stepping thread's (the state is needed then). A lock
guards the tiers between the two threads.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"ANYADKV1"
SUFFIX = ".kv"


def model_identity(path: str | Path, kv_type: str, engine_version: str, flash_attention: str) -> str:
    """What a saved state depends on: the exact model file, and how its KV cells are laid
    out (type, llama.cpp's version, flash attention: it stores V transposed without)."""
    p = Path(path).resolve()
    st = p.stat()
    with p.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|{head}|{kv_type}|{engine_version}|fa-{flash_attention}"


@dataclass(eq=False)
class _Entry:
    tokens: tuple[int, ...]
    size: int  # bytes of the state
    last_used: int
    data: bytes | None = None  # in RAM
    file: Path | None = None  # on disk


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the common prefix."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    def __init__(self, ram_bytes: int, identity: str, disk_dir: Path | None = None, disk_bytes: int = 0) -> None:
        self.ram_bytes = max(0, ram_bytes)
        self.identity = identity
        self.disk_bytes = max(0, disk_bytes) if disk_dir is not None else 0
        self._clock = itertools.count(1)
        self._ram: list[_Entry] = []
        self._disk: list[_Entry] = []
        self.dir: Path | None = None
        self.hits = self.misses = 0
        self._lock = threading.RLock()
        self._jobs: queue.SimpleQueue[tuple[_Entry, bool] | threading.Event | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if disk_dir is not None and self.disk_bytes:
            self.dir = disk_dir / hashlib.sha256(identity.encode()).hexdigest()[:32]
            self._scan()

    # ---- what the context asks ----

    @property
    def enabled(self) -> bool:
        return bool(self.ram_bytes or self.disk_bytes)

    def best(self, prompt: Sequence[int], at_least: int) -> tuple[_Entry, int] | None:
        """The saved state sharing the longest prefix with ``prompt``, if it shares at least
        ``at_least`` tokens (the RAM tier's when the two tiers tie)."""
        with self._lock:
            found: tuple[_Entry, int] | None = None
            for entry in [*self._ram, *self._disk]:
                n = shared_prefix(entry.tokens, prompt)
                if n >= at_least and (found is None or n > found[1]):
                    found = (entry, n)
            return found

    def load(self, entry: _Entry) -> bytes | None:
        """The state's bytes (from memory, else read and checked from disk); None when the
        file went or no longer belongs to this model (then it is forgotten)."""
        with self._lock:
            entry.last_used = next(self._clock)
            if entry.data is not None:
                return entry.data
            data = self._read(entry.file) if entry.file is not None else None
            if data is None or data[0] != entry.tokens:
                self.refused(entry)
                return None
            return data[1]

    def served(self, entry: _Entry) -> None:
        """The state was put back into a slot."""
        with self._lock:
            self.hits += 1

    def refused(self, entry: _Entry) -> None:
        """The state could not be read or llama.cpp refused it: never offered again."""
        with self._lock:
            self.misses += 1
            self._forget(entry)

    def put(self, tokens: Sequence[int], data: bytes) -> None:
        """Keep a conversation's state (it replaces any saved for a prefix of it, whose
        tokens it covers)."""
        key = tuple(tokens)
        if not key or not self.enabled:
            return
        with self._lock:
            for entry in [*self._ram, *self._disk]:
                if len(entry.tokens) <= len(key) and key[:len(entry.tokens)] == entry.tokens:
                    self._forget(entry)
            entry = _Entry(key, len(data), next(self._clock), data=data)
            if self.ram_bytes and len(data) <= self.ram_bytes:
                self._ram.append(entry)
                self._fit_ram()
            else:
                self._to_disk(entry)

    def flush(self, wait_s: float = 60.0) -> None:
        """Every state in RAM to disk too, and wait (up to ``wait_s``) for the writes: the
        model is unloading."""
        with self._lock:
            for entry in list(self._ram):
                if entry.file is None:
                    self._to_disk(entry, keep_in_ram=True)
        if self._writer is not None:
            if not self.written(wait_s):
                log.warning("prompt cache: the disk writes took longer than %.0f s; some are lost", wait_s)
            self._jobs.put(None)
            self._writer = None

    def written(self, wait_s: float) -> bool:
        """Wait until the disk writes queued so far are done; False if ``wait_s`` passed first."""
        if self._writer is None:
            return True
        done = threading.Event()
        self._jobs.put(done)
        return done.wait(wait_s)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"ram_entries": len(self._ram), "ram_bytes": sum(e.size for e in self._ram),
                    "disk_entries": len(self._disk), "disk_bytes": sum(e.size for e in self._disk),
                    "hits": self.hits, "misses": self.misses}

    # ---- the tiers ----

    def _fit_ram(self) -> None:
        while sum(e.size for e in self._ram) > self.ram_bytes:
            oldest = min(self._ram, key=lambda e: e.last_used)
            self._ram.remove(oldest)
            if oldest.file is None:
                self._to_disk(oldest)
            else:
                oldest.data = None
                self._disk.append(oldest)

    def _to_disk(self, entry: _Entry, keep_in_ram: bool = False) -> None:
        """Queue the entry's file to be written; until it is, the entry is served from memory."""
        if self.dir is None or entry.size > self.disk_bytes or entry.data is None:
            return
        if not keep_in_ram:
            self._disk.append(entry)
        self._jobs.put((entry, keep_in_ram))
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="prompt-cache-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            entry, keep_in_ram = job
            with self._lock:
                data = entry.data
                live = entry in self._ram or entry in self._disk
            if data is None or not live:
                continue
            target = self._write(entry, data)
            with self._lock:
                if not (entry in self._ram or entry in self._disk):  # forgotten meanwhile
                    if target is not None:
                        target.unlink(missing_ok=True)
                    continue
                if target is None:
                    if entry in self._disk:
                        self._disk.remove(entry)  # a write that failed: the state is not kept
                    continue
                entry.file = target
                if entry in self._disk:
                    entry.data = None
                self._fit_disk()

    def _write(self, entry: _Entry, data: bytes) -> Path | None:
        assert self.dir is not None
        name = hashlib.sha256(np.asarray(entry.tokens, np.int32).tobytes()).hexdigest()[:40] + SUFFIX
        target = self.dir / name
        tmp = target.with_suffix(".tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = target.with_suffix(".tmp")
            header = json.dumps({"identity": self.identity, "n_tokens": len(entry.tokens)}).encode()
            # Owner-only: the file holds a conversation's tokens.
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                f.write(np.asarray(entry.tokens, np.int32).tobytes())
                f.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("prompt cache: cannot write %s: %s", target, exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            return None
        return target

    def _fit_disk(self) -> None:
        on_disk = [e for e in [*self._ram, *self._disk] if e.file is not None]
        total = sum(e.size for e in on_disk)
        for entry in sorted(on_disk, key=lambda e: e.last_used):
            if total <= self.disk_bytes:
                return
            total -= entry.size
            self._unlink(entry)
            entry.file = None
            if entry in self._disk:
                self._disk.remove(entry)

    def _forget(self, entry: _Entry) -> None:
        for tier in (self._ram, self._disk):
            if entry in tier:
                tier.remove(entry)
        self._unlink(entry)

    @staticmethod
    def _unlink(entry: _Entry) -> None:
        if entry.file is not None:
            try:
                entry.file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("prompt cache: cannot remove %s: %s", entry.file, exc)

    def _read(self, path: Path, tokens_only: bool = False) -> tuple[tuple[int, ...], bytes] | None:
        """A file's tokens and state, if it is one of this model's."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                (n,) = struct.unpack("<I", f.read(4))
                if n > 1 << 16:
                    return None
                header = json.loads(f.read(n))
                if not isinstance(header, dict) or header.get("identity") != self.identity:
                    return None
                count = header.get("n_tokens")
                if not isinstance(count, int) or not 0 < 4 * count <= size - f.tell():
                    return None
                raw = f.read(4 * count)
                if len(raw) != 4 * count:
                    return None
                tokens = tuple(int(t) for t in np.frombuffer(raw, np.int32))
                return tokens, b"" if tokens_only else f.read()
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            log.warning("prompt cache: ignoring %s: %s", path, exc)
            return None

    def _scan(self) -> None:
        """The states a previous run left on disk for this model."""
        assert self.dir is not None
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                if path.suffix == ".tmp":  # a write cut short
                    path.unlink()
                    continue
                if path.suffix != SUFFIX:
                    continue
                got = self._read(path, tokens_only=True)
                if got is None:
                    path.unlink()  # another model's or a broken one: never served
                    continue
                st = path.stat()
                self._disk.append(_Entry(got[0], st.st_size, int(st.st_mtime_ns), file=path))
            except OSError as exc:
                log.warning("prompt cache: skipping %s: %s", path, exc)
        # Order the clock after what is on disk, so that new entries count as more recent.
        start = max((e.last_used for e in self._disk), default=0) + 1
        self._clock = itertools.count(start)
        self._fit_disk()
