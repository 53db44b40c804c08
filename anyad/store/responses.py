"""Stored responses (the Responses API's ``store``), in the history's database.

A response is written by the store's one writer after its exchange (so its conversation
row exists), and goes with its conversation: deleting the conversation, or the history's
retention, deletes it too. A key reads and deletes only its own (admin keys any).

Until its commit, a response is also kept in memory: a client that continues it at once
(``previous_response_id`` a moment after the reply) must find it, not a 404.
"""

from __future__ import annotations

import concurrent.futures
import time
import weakref
from dataclasses import dataclass
from typing import Any

from anyad.jsoncodec import dumps, loads
from anyad.store.history import HistoryReader
from anyad.store.writer import Store


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    conversation_id: str
    owner: str | None
    body: dict[str, Any]  # the response object
    messages: list[dict[str, Any]]  # the conversation through this response (chat messages)


# Per store: the responses written but not yet committed, by id.
_pending: "weakref.WeakKeyDictionary[Any, dict[str, StoredResponse]]" = weakref.WeakKeyDictionary()


def put(store: Store, r: StoredResponse) -> concurrent.futures.Future[Any]:
    row = (r.id, r.conversation_id, r.owner, time.time(), dumps(r.body), dumps(r.messages))
    pending = _pending.setdefault(store, {})
    pending[r.id] = r
    done = store.submit(lambda db: db.conn.execute(
        "INSERT OR REPLACE INTO responses (id, conversation_id, owner, created, body, messages) "
        "VALUES (?, ?, ?, ?, ?, ?)", row))
    # From the writer's thread; dict operations on one key are atomic under the GIL.
    done.add_done_callback(lambda _: pending.pop(r.id, None))
    return done


def get(reader: HistoryReader, response_id: str, owner: str | None = None) -> StoredResponse | None:
    """The response, if it exists and (``owner`` given) belongs to that key."""
    waiting = _pending.get(reader, {}).get(response_id)
    if waiting is not None:
        return waiting if owner is None or waiting.owner == owner else None
    conn = reader.read_connection()
    try:
        row = conn.execute("SELECT * FROM responses WHERE id = ?", (response_id,)).fetchone()
    finally:
        conn.close()
    if row is None or (owner is not None and row["owner"] != owner):
        return None
    return StoredResponse(row["id"], row["conversation_id"], row["owner"], loads(row["body"]),
                          loads(row["messages"]))


def delete(store: Store, response_id: str, owner: str | None = None) -> concurrent.futures.Future[bool]:
    # The DELETE queues behind the INSERT, so the committed row goes too; the memory copy now.
    waiting = _pending.get(store, {}).get(response_id)
    if waiting is not None and (owner is None or waiting.owner == owner):
        _pending[store].pop(response_id, None)
    if owner is None:
        return store.submit(lambda db: db.conn.execute("DELETE FROM responses WHERE id = ?",
                                                       (response_id,)).rowcount > 0)
    return store.submit(lambda db: db.conn.execute("DELETE FROM responses WHERE id = ? AND owner = ?",
                                                   (response_id, owner)).rowcount > 0)
