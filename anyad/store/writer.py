"""The store's one writer: a process of its own that batches the daemon's writes to ``anyad.db``.

It runs apart from the daemon so that its work (turning exchanges into rows, SQLite)
never holds the event loop's GIL: beside the event loop, in a thread, it cost a relay a
third of its peak throughput (``bench/README.md``). The daemon (``anyad.store.handle``)
sends it pickled items on its standard input: exchanges, audit and usage rows, stored
responses, and jobs (a function of this package and its arguments, run with the
database); it answers on its standard output with what the daemon waits for: each job's
result, and each kept response's token once it is written.

A batch is one transaction, committed at most ``batch_interval_s`` after its first item
arrived, so a reply never waits on the disk. When the daemon stops it sends ``STOP``;
when the daemon dies (``kill -9``) its standard input ends: either way what was received
is committed before the writer exits. It ignores SIGINT and SIGTERM (a terminal's Ctrl-C
and systemd's stop reach the whole process group): it ends when the daemon is done with it.

Started by ``Store`` as ``main([PATH, BATCH_INTERVAL_S, MAX_BATCH, LOG_LEVEL])``.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from sqlite_utils import Database

from anyad.jsoncodec import dumps
from anyad.store.connection import connect
from anyad.store.rows import AUDIT_INSERT, RESPONSE_INSERT, USAGE_INSERT, AuditRow, Exchange, ResponseRow, UsageRow
from anyad.store.search import SEARCH_INDEX_STEP, index_pending
from anyad.stream import content_text

log = logging.getLogger("anyad.store")

STOP = "stop"
MAX_SETTLED = 10000  # exchanges whose conversation a later stored response may need
HEADER = 4  # each message on the pipes: its length (4 bytes, little-endian), then its pickle

# (token, ok, the job's result or, not ok, why it failed)
Result = tuple[int, bool, Any]


@dataclass(slots=True)
class Job:
    """``fn(db, *args)`` in the writer, after what is already queued; ``fn`` a function of a
    module (it travels by name)."""

    token: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(slots=True)
class Kept:
    """A stored response; its token comes back once it is written."""

    token: int
    row: ResponseRow


def frame(item: Any) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(HEADER, "little") + data


def read_frame(stream: IO[bytes]) -> Any:
    """The next item, or STOP at the end of the stream."""
    head = stream.read(HEADER)
    if len(head) < HEADER:
        return STOP
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        return STOP
    return pickle.loads(data)


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


class Writer:
    """The batches, written: one transaction each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(connect(path))
        # request id -> the conversation its exchange went into
        self._settled: OrderedDict[str, str] = OrderedDict()

    def index(self) -> None:
        """Idle: bring the search index up to date, a step at a time."""
        self.write([Job(0, index_pending, (SEARCH_INDEX_STEP,))])

    def close(self) -> None:
        self._db.conn.close()

    def write(self, batch: list[Any]) -> list[Result]:
        """One transaction for the batch; if it fails, each item in its own, so that one
        bad item costs only itself. What the daemon waits for: each job's result, and
        each kept response's token once it is written (or could not be)."""
        try:
            with self._db.conn:
                done = self._apply(batch)
        except Exception:
            if len(batch) > 1:
                return [r for item in batch for r in self.write([item])]
            log.exception("could not write to %s", self.path)
            item = batch[0]
            if isinstance(item, Job):
                return [(item.token, False, "the history database refused the write; see the log")]
            if isinstance(item, Kept):
                return [(item.token, True, None)]
            return []
        while len(self._settled) > MAX_SETTLED:
            self._settled.popitem(last=False)
        return done

    def _apply(self, batch: list[Any]) -> list[Result]:
        """Runs of exchanges (and the responses that go with them, after them) are written
        together; jobs in their place between them."""
        done: list[Result] = []
        run: list[_Prepared] = []
        responses: list[Kept] = []
        audit: list[AuditRow] = []
        usage: list[UsageRow] = []
        for item in batch:
            if isinstance(item, Exchange):
                run.append(_Prepared.of(item))
                continue
            if isinstance(item, Kept):
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
            done.append((item.token, True, item.fn(self._db, *item.args)))
        if run or responses:
            self._write_run(run, responses, done)
        # Rows of one fixed shape: one prepared statement, reused (a multi-row VALUES list
        # would be parsed anew for every batch size).
        if audit:
            self._db.conn.executemany(AUDIT_INSERT, audit)
        if usage:
            self._db.conn.executemany(USAGE_INSERT, usage)
        return done

    def _write_run(self, run: list[_Prepared], responses: list[Kept], done: list[Result]) -> None:
        c = self._db.conn
        if run:
            self._write_exchanges(c, run)
        if responses:
            c.executemany(RESPONSE_INSERT, [self._response_row(k.row) for k in responses])
            done += [(k.token, True, None) for k in responses]

    def _response_row(self, r: ResponseRow) -> tuple[Any, ...]:
        """A stored response's row; its conversation its exchange's, as written (which may be
        a new one: see ``_write_exchanges``)."""
        resp = r.response
        cid = resp.conversation_id
        if r.exchange is not None:
            cid = self._settled.get(r.exchange.request_id, r.exchange.conversation_id)
        return (resp.id, cid, resp.owner, r.created, dumps(resp.body), dumps(resp.messages), dumps(resp.items))

    def _write_exchanges(self, c: sqlite3.Connection, batch: list[_Prepared]) -> None:
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
            self._settled[ex.request_id] = ex.conversation_id
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



def _item(item: Any) -> Any:
    """What the daemon sends as plain values, as the writer takes it."""
    if isinstance(item, tuple):
        kind, values = item
        return Exchange(*values) if kind == "x" else AuditRow(values) if kind == "a" else UsageRow(values)
    return item


def serve(path: Path, batch_interval_s: float, max_batch: int, inbox: IO[bytes], outbox: IO[bytes]) -> None:
    """Write what comes on ``inbox`` until STOP or its end; answer on ``outbox``."""
    writer = Writer(path)
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    ending = threading.Event()

    def receive() -> None:  # a thread: the pipe is emptied while a batch is written
        try:
            take()
        except BaseException:  # what cannot be read ends the writer: the daemon starts another
            log.exception("the store's writer cannot read what the daemon sent; it stops")
            items.put(STOP)
            ending.set()

    def take() -> None:
        while True:
            got = read_frame(inbox)
            if isinstance(got, list):  # plain items, sent together
                for item in got:
                    items.put(_item(item))
                continue
            items.put(got)
            if got == STOP:
                ending.set()
                return

    threading.Thread(target=receive, name="anyad-store-inbox", daemon=True).start()
    stop = False
    while not stop:
        first = items.get()
        if first == STOP:
            break
        ending.wait(batch_interval_s)  # the batch's window, cut short when the daemon is done
        batch = [first]
        while True:
            try:
                item = items.get_nowait()
            except queue.Empty:
                break
            if item == STOP:
                stop = True
                break
            batch.append(item)
        results = [r for i in range(0, len(batch), max_batch) for r in writer.write(batch[i:i + max_batch]) if r[0]]
        if results:
            try:
                outbox.write(frame(results))
                outbox.flush()
            except (BrokenPipeError, OSError):  # the daemon is gone; what it sent is still written
                pass
        if items.empty():
            writer.index()
    writer.close()


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    path, interval, max_batch, level = Path(argv[0]), float(argv[1]), int(argv[2]), argv[3]
    from anyad.logs import setup_logging

    setup_logging(level)
    try:
        serve(path, interval, max_batch, sys.stdin.buffer, sys.stdout.buffer)
    except sqlite3.Error as exc:
        log.error("the store's writer cannot go on with %s: %s", path, exc)
        return 1
    return 0

