"""``Store``: the daemon's side of the store, its reader, and the pipe to its writer process.

The writer (``anyad.store.writer``) is a process of its own, so that what writing costs
never holds the event loop's GIL. What the daemon hands it (an exchange, an audit or
usage row as plain values, a stored response) is queued and sent without blocking: from
the event loop, everything queued within ``SEND_EVERY_S`` goes in one pickle and one
write; from any other thread at once. A job (``submit``) is pickled at once, so one that
cannot travel fails its caller, and sent at once with what was queued before it. The
pipe is emptied by the writer continuously, so a write that finds it full is rare; the
rest then waits in memory for a thread that sends it when the pipe has room. Whatever is
queued before a ``flush()`` (from any thread) is written before it.

Results (a job's, a kept response's "written") come back on the writer's standard
output to a thread that waits on it, once per batch at most. If the writer dies
unexpectedly a new one is started; what the old one had not committed is lost (as on a
``kill -9`` of the daemon: at most one batch interval), and the jobs waiting on it fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import itertools
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from anyad.store import jobs
from anyad.store.connection import connect
from anyad.store.history import HistoryReader
from anyad.store.rows import AuditRow, Exchange, ResponseRow, UsageRow
from anyad.store.search import index_pending
from anyad.store.writer import STOP, Job, Kept, frame, read_frame

log = logging.getLogger("anyad.store")

MAX_CLAIMS = 10000  # conversation ids claimed but not yet written, kept per daemon
MAX_RESTARTS = 5  # writers started again within an hour after one died, before the store gives up
# From the event loop, items go to the writer this often at most, together: a writer
# woken for every request would cost more than its writing (the commit's window is what
# is left of batch_interval_s).
SEND_EVERY_S = 0.01
PIPE_BYTES = 1 << 20  # asked of the kernel for the pipe to the writer (it may give less)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# Not ``-m anyad.store.writer``: the package imports that module, and runpy would run a
# second copy of it, whose classes are not those the items are pickled as.
WRITER_MAIN = "import sys; from anyad.store.writer import main; sys.exit(main(sys.argv[1:]))"


class Store(HistoryReader):
    """The history's reader, and the way to its one writer (a process)."""

    def __init__(self, path: Path, *, batch_interval_s: float = 0.1, max_batch: int = 1000) -> None:
        super().__init__(path)
        self.batch_interval_s = batch_interval_s
        self.max_batch = max_batch
        # Created and migrated here, so that a file that cannot be used (damaged, from a newer
        # anyad) is refused now, by the daemon, and readers find the schema at once.
        connect(self.path).close()
        self._lock = threading.Lock()
        self._items: list[Any] = []  # plain items not sent yet, pickled together
        self._queued: list[bytes] = []  # framed, not sent yet
        self._scheduled = False
        self._unsent = bytearray()  # what the pipe had no room for
        self._room = threading.Event()  # the sender thread's cue
        self._waiting: dict[int, concurrent.futures.Future[Any] | Callable[[], None]] = {}
        self._tokens = itertools.count(1)
        self._closed = False
        self._deaths: list[float] = []  # when writers died unexpectedly (monotonic)
        self._proc = self._spawn()
        self._results = threading.Thread(target=self._receive, name="anyad-store-results", daemon=True)
        self._results.start()
        self._sender: threading.Thread | None = None
        # Conversation ids taken by a key whose first exchange is not written yet (the event
        # loop's; the least recent go first).
        self._claims: OrderedDict[str, str | None] = OrderedDict()

    def _spawn(self) -> subprocess.Popen[bytes]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_MAIN, str(self.path), str(max(0.0, self.batch_interval_s - SEND_EVERY_S)),
             str(self.max_batch), str(level)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # above the system's limit: the default will do
            pass
        os.set_blocking(fd, False)
        return proc

    def claim(self, conversation_id: str, owner: str | None) -> str | None:
        """Take a conversation id for ``owner`` until its first exchange is written; returns
        whoever holds the claim now (``owner`` unless another key claimed it first)."""
        holder = self._claims.setdefault(conversation_id, owner)
        self._claims.move_to_end(conversation_id)
        while len(self._claims) > MAX_CLAIMS:
            self._claims.popitem(last=False)
        return holder

    # -- sending ------------------------------------------------------------------------------

    def _put(self, item: Any) -> None:
        """Queue a plain item (a tuple of plain values, or a Kept); from the event loop it goes
        within SEND_EVERY_S with the others queued meanwhile, from any other thread at once."""
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is None:
                self._send_locked()
            elif not self._scheduled:
                self._scheduled = True
                loop.call_later(SEND_EVERY_S, self._send_queued)

    def _put_job(self, job: Job) -> None:
        data = frame(job)  # here: a job that cannot travel fails its caller
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._pack_locked()  # what was queued before it is written before it
            self._queued.append(data)
            self._send_locked()  # at once: it is waited for, maybe in this very turn of the loop

    def _send_queued(self) -> None:
        with self._lock:
            self._scheduled = False
            self._send_locked()

    def _pack_locked(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        try:
            self._queued.append(frame(items))
        except Exception:  # one item that cannot travel (a bug) must not take the others with it
            for item in items:
                try:
                    self._queued.append(frame([item]))
                except Exception:
                    log.exception("an item for the store cannot be sent to its writer; it is dropped")

    def _send_locked(self) -> None:
        self._pack_locked()
        if self._queued:
            self._unsent += b"".join(self._queued)
            self._queued.clear()
        if not self._unsent:
            return
        assert self._proc.stdin is not None
        try:
            n = os.write(self._proc.stdin.fileno(), self._unsent)
        except BlockingIOError:
            n = 0
        except (BrokenPipeError, OSError):  # the writer is gone: the results thread starts another
            return
        del self._unsent[:n]
        if self._unsent:  # the pipe is full: a thread waits for room, never the event loop
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_later, name="anyad-store-sender", daemon=True)
                self._sender.start()
            self._room.set()

    def _send_later(self) -> None:
        while True:
            self._room.wait()
            with self._lock:
                self._room.clear()
                if not self._unsent:
                    if self._closed:
                        return
                    continue
                stdin = self._proc.stdin
                fd = stdin.fileno() if stdin is not None and not stdin.closed else -1
            if fd < 0:
                return
            try:
                select.select([], [fd], [], 1.0)
            except (OSError, ValueError):  # closed meanwhile
                return
            with self._lock:
                before = len(self._unsent)
                self._send_locked()
                stuck = bool(self._unsent) and len(self._unsent) == before
                if self._unsent:
                    self._room.set()
            if stuck:  # a writer gone (until the results thread starts another): do not spin
                time.sleep(0.05)

    def _token(self, waiter: concurrent.futures.Future[Any] | Callable[[], None]) -> int:
        with self._lock:  # the results thread swaps the dict when a writer dies
            token = next(self._tokens)
            self._waiting[token] = waiter
        return token

    # -- what the daemon writes ---------------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Queue an exchange for the next batch; never blocks. The writer makes its rows."""
        self._put(("x", exchange.fields()))

    def audit(self, row: AuditRow | UsageRow) -> None:
        """Queue an audit or usage row for the next batch; never blocks."""
        self._put(("a" if isinstance(row, AuditRow) else "u", tuple(row)))

    def keep_response(self, row: ResponseRow) -> None:
        """Queue a stored response for the next batch, after its exchange; never blocks.
        ``row.done`` is called (from another thread) once it is written, or could not be."""
        done = row.done or (lambda: None)
        if self._closed:
            done()
            return
        self._put(Kept(self._token(done), ResponseRow(row.response, row.created, row.exchange)))

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(db, *args)`` in the writer, after what is already queued: ``fn`` a
        module's function (see ``anyad.store.jobs``), ``args`` what pickle takes."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(RuntimeError("the store is closed"))
            return future
        token = self._token(future)
        try:
            self._put_job(Job(token, fn, args))
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return future

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is committed."""
        self.submit(jobs.nothing).result(timeout)

    def delete(self, conversation_id: str, owner: str | None = None) -> concurrent.futures.Future[bool]:
        return self.submit(jobs.delete_conversation, conversation_id, owner)

    def purge(self) -> concurrent.futures.Future[int]:
        return self.submit(jobs.purge)

    def apply_retention(self, max_age_days: float, max_conversations: int) -> concurrent.futures.Future[int]:
        """Delete conversations older than ``max_age_days`` and beyond the newest ``max_conversations``
        (0 turns either off); the future gives how many went."""
        return self.submit(jobs.retention, max_age_days, max_conversations)

    def index_for_search(self) -> None:
        # In the daemon the writer does it, after what is queued: searches see every reply.
        self.submit(index_pending).result(30)

    # -- results ------------------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            proc = self._proc
            assert proc.stdout is not None
            got = read_frame(proc.stdout)
            if got != STOP:
                for token, ok, value in got:
                    self._settle(token, ok, value)
                continue
            code = proc.wait()
            with self._lock:
                lost, self._waiting = self._waiting, {}
                if not self._closed:
                    now = time.monotonic()
                    self._deaths = [t for t in self._deaths if now - t < 3600] + [now]
                    if len(self._deaths) > MAX_RESTARTS:
                        log.error("the store's writer exited (code %s) %d times within the hour; nothing more is "
                                  "written to %s until anyad restarts", code, len(self._deaths), self.path)
                        self._closed = True
                        self._unsent.clear()
                        self._items.clear()
                        self._queued.clear()
                        self._room.set()
                    else:
                        log.error("the store's writer exited unexpectedly (code %s); starting another; what it "
                                  "had not committed is lost", code)
                        self._proc = self._spawn()
                        self._unsent.clear()
            for token, waiter in lost.items():
                self._settle_waiter(waiter, False, "the store's writer exited before it was written")
            if self._closed:
                return

    def _settle(self, token: int, ok: bool, value: Any) -> None:
        waiter = self._waiting.pop(token, None)
        if waiter is not None:
            self._settle_waiter(waiter, ok, value)

    @staticmethod
    def _settle_waiter(waiter: concurrent.futures.Future[Any] | Callable[[], None], ok: bool, value: Any) -> None:
        if not isinstance(waiter, concurrent.futures.Future):
            waiter()
        elif waiter.set_running_or_notify_cancel():  # False: its caller gave up
            if ok:
                waiter.set_result(value)
            else:
                waiter.set_exception(RuntimeError(value))

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued, let the writer commit it, and wait for it to end."""
        with self._lock:
            if self._closed:
                return
            self._pack_locked()
            self._queued.append(frame(STOP))
            self._closed = True
            deadline = timeout
            self._send_locked()
        proc = self._proc
        # What the pipe had no room for yet goes as the writer reads.
        while self._unsent and proc.poll() is None and deadline > 0:
            assert proc.stdin is not None
            select.select([], [proc.stdin.fileno()], [], 0.1)
            deadline -= 0.1
            with self._lock:
                self._send_locked()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the store's writer did not finish within %.0f s; stopping it", timeout)
            proc.kill()
            proc.wait()
        self._room.set()
        self._results.join(timeout)
