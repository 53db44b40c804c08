"""The history's full-text index (``messages_fts``): brought up to date in the background
by the writer, or before a search, rather than by trigger on every insert."""

from __future__ import annotations

import re

from sqlite_utils import Database

SEARCH_INDEX_STEP = 5000  # messages indexed per idle pass


def index_pending(db: Database, limit: int | None = None) -> int:
    """Add messages not yet in the full-text index (all of them, or up to ``limit``)."""
    c = db.conn
    # A write first: it opens the transaction and takes the write lock, so two indexers
    # (the daemon's writer and a CLI search) can never both read the same starting point.
    c.execute("UPDATE search_index SET last_id = last_id WHERE id = 1")
    (last,) = c.execute("SELECT last_id FROM search_index WHERE id = 1").fetchone()
    top_sql = "SELECT max(id) FROM messages" if limit is None else \
        "SELECT max(id) FROM (SELECT id FROM messages WHERE id > ? ORDER BY id LIMIT ?)"
    (top,) = c.execute(top_sql, () if limit is None else (last, limit)).fetchone()
    if top is None or top <= last:
        return 0
    n = c.execute("INSERT INTO messages_fts (rowid, content) SELECT id, content FROM messages "
                  "WHERE id > ? AND id <= ?", (last, top)).rowcount
    c.execute("UPDATE search_index SET last_id = ? WHERE id = 1", (top,))
    return n


def fts_query(q: str) -> str:
    """A user's search words as an FTS5 query that cannot be a syntax error: each word a
    quoted phrase (quotes doubled), all of them required."""
    q = re.sub(r"[\x00-\x1f\x7f]", " ", q)  # FTS5 cannot take control characters, even quoted
    words = [w for w in re.split(r"\s+", q.strip()) if w]
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)
