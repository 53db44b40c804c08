"""The store's one writer: a thread that batches the daemon's writes to ``anyad.db``.

A batch is one transaction, committed at most ``batch_interval_s`` after its first item
arrived, so a reply never waits on the disk and a ``kill -9`` loses at most that
interval. ``close()`` drains what is queued.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqlite_utils import Database

from anyad.jsoncodec import dumps
from anyad.store.connection import connect
from anyad.store.history import HistoryReader
from anyad.store.rows import AUDIT_INSERT, RESPONSE_INSERT, USAGE_INSERT, AuditRow, Exchange, ResponseRow, UsageRow
from anyad.store.search import SEARCH_INDEX_STEP, index_pending
from anyad.stream import content_text

log = logging.getLogger("anyad.store")

MAX_CLAIMS = 10000  # conversation ids claimed but not yet written, kept per daemon
_STOP = object()


@dataclass(slots=True)
class _Job:
    fn: Callable[[Database], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


@dataclass(slots=True)
class _Prepared:
    ex: Exchange
    messages: list[tuple[str, str | None, str | None]]  # (role, text, extra JSON) as sent
    reply: tuple[str, str | None, str | None] | None
    title: str | None

    @classmethod
    def of(cls, ex: Exchange) -> "_Prepared":
        messages = [_message_row(m) for m in ex.messages]
        title = next((text for role, text, _ in messages if role == "user" and text), None)
        return cls(ex, messages, _message_row(ex.reply) if ex.reply is not None else None,
                   (title or "")[:120] or None)


def _insert(c: sqlite3.Connection, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
    """Many rows in few statements: the GIL is released once per statement, not per row."""
    if not rows:
        return
    width = len(rows[0])
    per = max(1, 30000 // width)  # under SQLite's limit on bound parameters
    one = "(" + ",".join("?" * width) + ")"
    for i in range(0, len(rows), per):
        chunk = rows[i:i + per]
        c.execute(f"INSERT INTO {table} ({columns}) VALUES " + ",".join([one] * len(chunk)),
                  [v for row in chunk for v in row])


def _message_row(m: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(role, searchable text, JSON of the rest) for one message."""
    content = m.get("content")
    extra = {k: v for k, v in m.items() if k not in ("role", "content")}
    text = None if content is None else content_text(content)
    if isinstance(content, list) and any(not (isinstance(p, dict) and p.get("type") == "text") for p in content):
        extra["content"] = content
    return str(m.get("role", "")), text, (dumps(extra) if extra else None)


def _response_row(r: ResponseRow) -> tuple[Any, ...]:
    """A stored response's row; its conversation its exchange's, as written."""
    resp = r.response
    cid = r.exchange.conversation_id if r.exchange is not None else resp.conversation_id
    return (resp.id, cid, resp.owner, r.created, dumps(resp.body), dumps(resp.messages), dumps(resp.items))


class Store(HistoryReader):
    """The history's one writer (a thread), and its reader."""

    def __init__(self, path: Path, *, batch_interval_s: float = 0.1, max_batch: int = 1000) -> None:
        super().__init__(path)
        self.batch_interval_s = batch_interval_s
        self.max_batch = max_batch
        # The writer thread's own from here on.
        self._db = Database(connect(self.path, check_same_thread=False))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anyad-store-writer", daemon=True)
        self._thread.start()
        # Conversation ids taken by a key whose first exchange is not written yet (the event
        # loop's; the least recent go first).
        self._claims: OrderedDict[str, str | None] = OrderedDict()

    def claim(self, conversation_id: str, owner: str | None) -> str | None:
        """Take a conversation id for ``owner`` until its first exchange is written; returns
        whoever holds the claim now (``owner`` unless another key claimed it first)."""
        holder = self._claims.setdefault(conversation_id, owner)
        self._claims.move_to_end(conversation_id)
        while len(self._claims) > MAX_CLAIMS:
            self._claims.popitem(last=False)
        return holder

    # -- writing (one thread) --------------------------------------------------------------

    def record(self, exchange: Exchange) -> None:
        """Queue an exchange for the next batch; never blocks.

        Its rows are prepared here, in the caller's thread, so that the writer thread holds
        the GIL as little as possible: it runs beside the event loop.
        """
        if not self._closed:
            self._queue.put(_Prepared.of(exchange))

    def audit(self, row: AuditRow | UsageRow) -> None:
        """Queue an audit or usage row for the next batch; never blocks."""
        if not self._closed:
            self._queue.put(row)

    def keep_response(self, row: ResponseRow) -> None:
        """Queue a stored response for the next batch, after its exchange; never blocks.

        Its JSON is made in the writer thread, and it is written with the batch's exchanges
        (a job between them would cut their run in two, and cost each its own queries).
        ``row.done`` is called once it is written, or could not be.
        """
        if self._closed:
            if row.done is not None:
                row.done()
            return
        self._queue.put(row)

    def submit(self, fn: Callable[[Database], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` in the writer thread, after what is already queued."""
        job = _Job(fn)
        if self._closed:
            job.future.set_exception(RuntimeError("the store is closed"))
        else:
            self._queue.put(job)
        return job.future

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is committed."""
        self.submit(lambda db: None).result(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            # Sleep through the batch interval, then take everything that came meanwhile:
            # waking for each item would hand the GIL back and forth with the event loop.
            self._closing.wait(self.batch_interval_s)  # cut short by close()
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            for i in range(0, len(batch), self.max_batch):
                self._write(batch[i:i + self.max_batch])
            if self._queue.empty():  # idle: bring the search index up to date
                self._write([_Job(lambda db: index_pending(db, SEARCH_INDEX_STEP))])
        self._db.conn.close()

    def _write(self, batch: list[Any]) -> None:
        """One transaction for the batch; if it fails, each item in its own, so that one
        bad item costs only itself."""
        try:
            with self._db.conn:
                done = self._apply(batch)
        except Exception:
            if len(batch) > 1:
                for item in batch:
                    self._write([item])
                return
            log.exception("could not write to %s", self.path)
            item = batch[0]
            if isinstance(item, _Job) and (item.future.running() or item.future.set_running_or_notify_cancel()):
                item.future.set_exception(RuntimeError("the history database refused the write; see the log"))
            elif isinstance(item, ResponseRow) and item.done is not None:
                item.done()
            return
        for item, result in done:
            if isinstance(item, ResponseRow):
                if item.done is not None:
                    item.done()
            else:
                item.future.set_result(result)

    def _apply(self, batch: list[Any]) -> list[tuple[_Job | ResponseRow, Any]]:
        """Runs of exchanges (and the responses that go with them, after them) are written
        together; jobs in their place between them."""
        done: list[tuple[_Job | ResponseRow, Any]] = []
        run: list[_Prepared] = []
        responses: list[ResponseRow] = []
        audit: list[AuditRow] = []
        usage: list[UsageRow] = []
        for item in batch:
            if isinstance(item, _Prepared):
                run.append(item)
                continue
            if isinstance(item, ResponseRow):
                responses.append(item)
                continue
            if isinstance(item, AuditRow):
                audit.append(item)
                continue
            if isinstance(item, UsageRow):
                usage.append(item)
                continue
            if run or responses:
                self._write_run(run, responses, done)
                run, responses = [], []
            if item.future.running() or item.future.set_running_or_notify_cancel():  # False: its caller gave up
                done.append((item, item.fn(self._db)))
        if run or responses:
            self._write_run(run, responses, done)
        # Rows of one fixed shape: one prepared statement, reused (a multi-row VALUES list
        # would be parsed anew for every batch size).
        if audit:
            self._db.conn.executemany(AUDIT_INSERT, audit)
        if usage:
            self._db.conn.executemany(USAGE_INSERT, usage)
        return done

    def _write_run(self, run: list[_Prepared], responses: list[ResponseRow],
                   done: list[tuple[_Job | ResponseRow, Any]]) -> None:
        c = self._db.conn
        if run:
            self._write_exchanges(c, run)
        if responses:
            c.executemany(RESPONSE_INSERT, [_response_row(r) for r in responses])
            done += [(r, None) for r in responses]

    @staticmethod
    def _write_exchanges(c: sqlite3.Connection, batch: list[_Prepared]) -> None:
        now = time.time()
        ids = list({p.ex.conversation_id for p in batch})
        marks = ",".join("?" * len(ids))
        owners = dict(c.execute(f"SELECT id, owner FROM conversations WHERE id IN ({marks})", ids).fetchall())
        # The one rule, held where the rows are written too: an exchange goes into another
        # key's conversation only when it may (an admin key's); else into a new one of its own.
        for p in batch:
            ex = p.ex
            cid = ex.conversation_id
            if cid not in owners:
                owners[cid] = ex.owner
            elif owners[cid] != ex.owner and not ex.any_conversation:
                fresh = f"{cid[:100]}.{os.urandom(6).hex()}"
                log.warning("request %s: conversation %s belongs to another key; its exchange is kept as %s",
                            ex.request_id, cid, fresh)
                ex.conversation_id = owners[fresh] = fresh
        ids = list({p.ex.conversation_id for p in batch})
        marks = ",".join("?" * len(ids))
        known = {r[0] for r in c.execute(f"SELECT id FROM conversations WHERE id IN ({marks})", ids)}
        # The messages already stored, for conversations that go on (what a client sends
        # again is not stored twice).
        stored: dict[str, list[tuple[str, str | None, str | None]]] = {cid: [] for cid in ids}
        if known:
            marks_k = ",".join("?" * len(known))
            for cid, role, content, extra in c.execute(
                    f"SELECT conversation_id, role, content, extra FROM messages WHERE conversation_id IN ({marks_k}) "
                    "ORDER BY conversation_id, seq", list(known)):
                stored[cid].append((role, content, extra))
        (next_exchange,) = c.execute("SELECT coalesce(max(id), 0) + 1 FROM exchanges").fetchone()
        new_convs: dict[str, list[Any]] = {}
        updates: dict[str, list[Any]] = {}
        exchanges, messages = [], []
        for p in batch:
            ex, cid = p.ex, p.ex.conversation_id
            have = stored[cid]
            same = 0
            while same < min(len(have), len(p.messages)) and have[same] == p.messages[same]:
                same += 1
            rows = p.messages[same:] + ([p.reply] if p.reply is not None else [])
            eid = next_exchange
            next_exchange += 1
            for i, (role, text, extra) in enumerate(rows):
                is_reply = p.reply is not None and i == len(rows) - 1
                messages.append((cid, len(have) + i, role, text, extra, eid if is_reply else None, now))
            have.extend(rows)
            exchanges.append((eid, cid, ex.request_id, ex.model, ex.backend, int(ex.stream), ex.cache,
                              ex.prompt_tokens, ex.completion_tokens, ex.latency_ms, ex.ttft_ms, ex.finish_reason,
                              ex.started, ex.started + ex.latency_ms / 1000))
            finished = ex.started + ex.latency_ms / 1000
            if cid in known:
                u = updates.setdefault(cid, [finished, ex.model, 0, 0, cid])
                u[0], u[1], u[2], u[3] = max(u[0], finished), ex.model, u[2] + len(rows), u[3] + 1
            else:
                n = new_convs.setdefault(cid, [cid, ex.started, finished, p.title, ex.model, 0, 0, ex.owner])
                n[2], n[4], n[5], n[6] = max(n[2], finished), ex.model, n[5] + len(rows), n[6] + 1
        _insert(c, "conversations", "id, created, updated, title, model, messages, exchanges, owner",
                [tuple(v) for v in new_convs.values()])
        c.executemany("UPDATE conversations SET updated = ?, model = ?, messages = messages + ?, "
                      "exchanges = exchanges + ? WHERE id = ?", [tuple(v) for v in updates.values()])
        _insert(c, "exchanges", "id, conversation_id, request_id, model, backend, stream, cache, prompt_tokens, "
                "completion_tokens, latency_ms, ttft_ms, finish_reason, started, finished", exchanges)
        _insert(c, "messages", "conversation_id, seq, role, content, extra, exchange_id, created", messages)

    def delete(self, conversation_id: str, owner: str | None = None) -> concurrent.futures.Future[bool]:
        if owner is None:
            return self.submit(lambda db: db.conn.execute("DELETE FROM conversations WHERE id = ?",
                                                          (conversation_id,)).rowcount > 0)
        return self.submit(lambda db: db.conn.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                                                      (conversation_id, owner)).rowcount > 0)

    def purge(self) -> concurrent.futures.Future[int]:
        return self.submit(lambda db: db.conn.execute("DELETE FROM conversations").rowcount)

    def apply_retention(self, max_age_days: float, max_conversations: int) -> concurrent.futures.Future[int]:
        """Delete conversations older than ``max_age_days`` and beyond the newest ``max_conversations``
        (0 turns either off); the future gives how many went."""

        def run(db: Database) -> int:
            gone = 0
            if max_age_days:
                gone += db.conn.execute("DELETE FROM conversations WHERE updated < ?",
                                        (time.time() - max_age_days * 86400,)).rowcount
            if max_conversations:
                gone += db.conn.execute(
                    "DELETE FROM conversations WHERE id NOT IN "
                    "(SELECT id FROM conversations ORDER BY updated DESC LIMIT ?)", (max_conversations,)).rowcount
            return gone

        return self.submit(run)

    def index_for_search(self) -> None:
        # In the daemon the writer does it, after what is queued: searches see every reply.
        self.submit(index_pending).result(30)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._closing.set()
        self._thread.join(timeout)
