"""Worker processes: one per loaded local model, owned by the daemon.

The engine runs in a child process so that a crash in native code costs one
request rather than the daemon, so that unloading gives every byte back to the
OS (the process ends), and so that the event loop never waits on generation.
The child runs a backend's worker module (``python -m MODULE``) and speaks the
framed protocol of ``anyad.protocol`` over its stdin/stdout.

One reader task per worker owns the stdout stream and dispatches frames to the
request they belong to; a cancelled request therefore never leaves a half-read
frame behind for the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from typing import Any, AsyncGenerator

from anyad import protocol
from anyad.errors import AnyadError, BackendError, LoadFailed, Unavailable

log = logging.getLogger("anyad.workers")

_GONE = {"t": "gone"}


class WorkerFailed(BackendError):
    """The worker process died mid-request or speaks another protocol."""


class WorkerProcess:
    def __init__(self, name: str, module: str, load: dict[str, Any], *, load_timeout_s: float = 120.0) -> None:
        self.name = name
        self.module = module
        self.load = load
        self.load_timeout_s = load_timeout_s
        self.env: dict[str, str] = {}  # set per load, e.g. which GPU the process may see
        self.proc: asyncio.subprocess.Process | None = None
        self.facts: dict[str, Any] = {}
        self._reader: asyncio.Task[None] | None = None
        self._inbox: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._control: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._start_lock = asyncio.Lock()
        self.last_exit: str | None = None
        self._loaded_by: asyncio.subprocess.Process | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._reader is not None \
            and not self._reader.done()

    @property
    def loaded(self) -> bool:
        """Running with its model loaded: what readiness means."""
        return self.alive and self._loaded_by is self.proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc else None

    async def ensure_started(self) -> None:
        async with self._start_lock:
            if not self.alive:
                await self._start()

    async def _start(self) -> None:
        await self._reap()
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            limit=protocol.MAX_FRAME,
        )
        self._control = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_loop(self.proc), name=f"worker-reader-{self.name}")
        self._send({"op": "load", "version": protocol.PROTOCOL_VERSION, **self.load})
        try:
            await asyncio.wait_for(self._await_ready(), self.load_timeout_s)
        except asyncio.TimeoutError:
            await self.stop()
            raise Unavailable(f"model {self.name!r} did not load within {self.load_timeout_s:g} s") from None
        except AnyadError:
            await self.stop()
            raise
        log.info("model %s loaded in worker pid %s (%s)", self.name, self.proc.pid,
                 ", ".join(f"{k}={v}" for k, v in self.facts.items() if k not in ("t",)))

    async def _await_ready(self) -> None:
        while True:
            frame = await self._control.get()
            if frame["t"] == "hello" and frame.get("version") != protocol.PROTOCOL_VERSION:
                raise WorkerFailed(f"model {self.name!r}: worker speaks protocol {frame.get('version')}, "
                                   f"daemon {protocol.PROTOCOL_VERSION}")
            if frame["t"] == "ready":
                self.facts = frame
                self._loaded_by = self.proc
                return
            if frame["t"] == "fatal":
                raise LoadFailed(f"model {self.name!r} failed to load: {frame.get('message')}")
            if frame is _GONE:
                raise LoadFailed(f"model {self.name!r}: worker exited while loading ({self.last_exit})")

    async def _read_loop(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                frame = await protocol.read_frame(proc.stdout)
                rid = frame.get("id")
                box = self._inbox.get(rid) if rid is not None else None
                if box is not None:
                    box.put_nowait(frame)
                elif rid is None:
                    self._control.put_nowait(frame)
                # else: a frame for a request that was cancelled; drop it.
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            if isinstance(exc, ValueError):
                log.error("model %s: worker sent a malformed frame: %s", self.name, exc)
                proc.kill()
        rc = await proc.wait()
        self.last_exit = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        log.warning("model %s: worker pid %s ended (%s)", self.name, proc.pid, self.last_exit) if rc else \
            log.info("model %s: worker pid %s ended", self.name, proc.pid)
        for box in self._inbox.values():
            box.put_nowait(_GONE)
        self._control.put_nowait(_GONE)

    def _send(self, obj: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            raise WorkerFailed(f"model {self.name!r}: worker is not running")
        self.proc.stdin.write(protocol.encode(obj))

    async def request(self, op: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Send one operation and yield its frames until ``end``; cancels it in the worker if abandoned."""
        if not self.alive:
            raise WorkerFailed(f"model {self.name!r}: worker is not running")
        rid = next(self._ids)
        box: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._inbox[rid] = box
        finished = False
        try:
            self._send({**op, "id": rid})
            while True:
                frame = await box.get()
                if frame is _GONE:
                    finished = True
                    raise WorkerFailed(f"model {self.name!r}: worker crashed ({self.last_exit}); "
                                       "the next request starts a new one")
                if frame["t"] in ("end", "error", "stats"):
                    finished = True
                yield frame
                if finished:
                    return
        finally:
            del self._inbox[rid]
            if not finished and self.alive:
                # The consumer went away (client disconnect): stop generating within a token.
                try:
                    self._send({"op": "cancel", "id": rid})
                except (AnyadError, ConnectionError):
                    pass

    async def stats(self) -> dict[str, Any]:
        """The worker's own counters (busy, tokens generated), answered even mid-generation."""
        async for frame in self.request({"op": "stats"}):
            return frame
        raise WorkerFailed(f"model {self.name!r}: no stats")  # pragma: no cover

    async def stop(self, grace_s: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                self._send({"op": "shutdown"})
                if proc.stdin:
                    proc.stdin.close()
            except (AnyadError, ConnectionError):
                pass
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                proc.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        self._reader = None
