"""Reading the chat history: pages of conversations (searched with the full-text index),
one conversation whole, its owner, the export of them all."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from sqlite_utils import Database

from anyad.jsoncodec import loads
from anyad.store.connection import read_only
from anyad.store.search import fts_query, index_pending

CONVERSATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_QUERY_CHARS = 1000


class HistoryReader:
    """Reads the history; any thread, a read-only connection per call (WAL lets it run
    beside the writer, in this process or the daemon's)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def index_for_search(self) -> None:
        """Make the full-text index cover every message before a search."""
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:
                index_pending(Database(conn))
        finally:
            conn.close()

    def read_connection(self) -> sqlite3.Connection:
        return read_only(self.path, timeout=10, rows=True)

    def conversations(self, *, limit: int = 20, offset: int = 0, q: str | None = None,
                      owner: str | None = None) -> dict[str, Any]:
        """A page of conversations, newest first; ``q`` keeps those with a message matching all
        its words, ``owner`` those of one API key."""
        conds, args = [], []
        query = fts_query(q) if q else ""
        if query:
            self.index_for_search()
            conds.append("id IN (SELECT conversation_id FROM messages WHERE id IN "
                         "(SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?))")
            args.append(query)
        if owner is not None:
            conds.append("owner = ?")
            args.append(owner)
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        conn = self.read_connection()
        try:
            total = conn.execute(f"SELECT count(*) FROM conversations {where}", args).fetchone()[0]
            rows = conn.execute(f"SELECT * FROM conversations {where} ORDER BY updated DESC, id LIMIT ? OFFSET ?",
                                [*args, limit, offset]).fetchall()
        finally:
            conn.close()
        return {"total": total, "limit": limit, "offset": offset, "data": [dict(r) for r in rows]}

    def conversation(self, conversation_id: str, owner: str | None = None) -> dict[str, Any] | None:
        conn = self.read_connection()
        try:
            row = conn.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            if row is None or (owner is not None and row["owner"] != owner):
                return None
            messages = conn.execute("SELECT seq, role, content, extra, exchange_id, created FROM messages "
                                    "WHERE conversation_id = ? ORDER BY seq", (conversation_id,)).fetchall()
            exchanges = conn.execute("SELECT * FROM exchanges WHERE conversation_id = ? ORDER BY id",
                                     (conversation_id,)).fetchall()
        finally:
            conn.close()
        out = dict(row)
        out["messages"] = []
        for m in messages:
            msg = {"role": m["role"], "content": m["content"], **(loads(m["extra"]) if m["extra"] else {}),
                   "seq": m["seq"], "created": m["created"]}
            if m["exchange_id"] is not None:
                msg["exchange_id"] = m["exchange_id"]
            out["messages"].append(msg)
        out["exchanges"] = [dict(x) for x in exchanges]
        return out

    def owner(self, conversation_id: str) -> tuple[bool, str | None]:
        """(whether the conversation exists, the key that owns it)."""
        conn = self.read_connection()
        try:
            row = conn.execute("SELECT owner FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        finally:
            conn.close()
        return (False, None) if row is None else (True, row[0])

    def export(self) -> Iterator[dict[str, Any]]:
        """Every conversation, whole, oldest first."""
        conn = self.read_connection()
        try:
            ids = [r[0] for r in conn.execute("SELECT id FROM conversations ORDER BY created, id")]
        finally:
            conn.close()
        for cid in ids:
            conv = self.conversation(cid)
            if conv is not None:
                yield conv
