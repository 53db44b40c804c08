"""Stored responses (the Responses API's ``store``), in the history's database.

A response is written by the store's one writer in the batch of its exchange, after it
(so its conversation row exists, and is the one the writer gave the exchange), its JSON
made by the writer; it goes with its conversation: deleting the conversation, or
the history's retention, deletes it too. A key reads and deletes only its own (admin keys
any). Besides the response object it keeps the conversation through it (chat messages,
for ``previous_response_id``) and the items it was made from (for ``input_items``).

Until its commit, a response is also kept in memory: a client that continues it at once
(``previous_response_id`` a moment after the reply) must find it, not a 404.
"""

from __future__ import annotations

import concurrent.futures
import time
import weakref
from typing import Any

from anyad.jsoncodec import loads
from anyad.store import jobs
from anyad.store.handle import Store
from anyad.store.history import HistoryReader
from anyad.store.rows import Exchange, ResponseRow, StoredResponse

__all__ = ["StoredResponse", "delete", "get", "put"]

# Per store: the responses written but not yet committed, by id.
_pending: "weakref.WeakKeyDictionary[Any, dict[str, StoredResponse]]" = weakref.WeakKeyDictionary()


def put(store: Store, r: StoredResponse, exchange: Exchange | None = None) -> None:
    """Keep ``r`` (after ``exchange``, the history's record of its reply, whose conversation
    it goes into): in memory at once, in the database with the writer's next batch."""
    pending = _pending.setdefault(store, {})
    pending[r.id] = r

    def written() -> None:  # from the store's results thread; dict operations on one key are atomic under the GIL
        pending.pop(r.id, None)

    store.keep_response(ResponseRow(r, time.time(), exchange, written))


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
    # A response kept before its items were (NULL): none to list.
    return StoredResponse(row["id"], row["conversation_id"], row["owner"], loads(row["body"]),
                          loads(row["messages"]), loads(row["items"]) if row["items"] is not None else [])


def delete(store: Store, response_id: str, owner: str | None = None) -> concurrent.futures.Future[bool]:
    # The DELETE queues behind the INSERT, so the committed row goes too; the memory copy now.
    waiting = _pending.get(store, {}).get(response_id)
    if waiting is not None and (owner is None or waiting.owner == owner):
        _pending[store].pop(response_id, None)
    return store.submit(jobs.delete_response, response_id, owner)
