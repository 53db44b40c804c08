"""What the daemon asks the store's writer to do besides recording: each a function of
``(db, *args)`` that travels to the writer process by name (``Store.submit``), so it
lives here, in a module the writer imports anyway, and not as a closure."""

from __future__ import annotations

import time

from sqlite_utils import Database


def nothing(db: Database) -> None:
    """A flush: its result comes once everything queued before it is committed."""


def delete_conversation(db: Database, conversation_id: str, owner: str | None) -> bool:
    if owner is None:
        return db.conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0
    return db.conn.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                           (conversation_id, owner)).rowcount > 0


def purge(db: Database) -> int:
    return db.conn.execute("DELETE FROM conversations").rowcount


def retention(db: Database, max_age_days: float, max_conversations: int) -> int:
    """Delete conversations older than ``max_age_days`` and beyond the newest
    ``max_conversations`` (0 turns either off); how many went."""
    gone = 0
    if max_age_days:
        gone += db.conn.execute("DELETE FROM conversations WHERE updated < ?",
                                (time.time() - max_age_days * 86400,)).rowcount
    if max_conversations:
        gone += db.conn.execute("DELETE FROM conversations WHERE id NOT IN "
                                "(SELECT id FROM conversations ORDER BY updated DESC LIMIT ?)",
                                (max_conversations,)).rowcount
    return gone


def audit_retention(db: Database, cutoff: float) -> int:
    """The audit log's rows older than ``cutoff`` go; requests' usage rows stay (quotas and
    reports count them) without their audit facts: who sent them and their content."""
    gone = db.conn.execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount
    gone += db.conn.execute("UPDATE usage SET audited = 0, actor = NULL, detail = NULL WHERE audited = 1 AND at < ?",
                            (cutoff,)).rowcount
    return gone


def delete_response(db: Database, response_id: str, owner: str | None) -> bool:
    if owner is None:
        return db.conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
    return db.conn.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0


def cache_touch(db: Database, used: float, key: str) -> None:
    db.conn.execute("UPDATE cache SET last_used = ?, hits = hits + 1 WHERE key = ?", (used, key))


def cache_put(db: Database, key: str, model: str, backend: str, reply: str, now: float, ttl_s: float,
              max_entries: int, max_bytes: int) -> None:
    """An entry in, then the least recently used out until both caps hold again."""
    c = db.conn
    c.execute("INSERT OR REPLACE INTO cache (key, model, backend, reply, bytes, created, last_used, expires, hits) "
              "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)", (key, model, backend, reply, len(reply), now, now, now + ttl_s))
    count, size = c.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM cache").fetchone()
    if count > max_entries or size > max_bytes:
        drop, freed = 0, 0
        for (b,) in c.execute("SELECT bytes FROM cache ORDER BY last_used, created"):
            if count - drop <= max_entries and size - freed <= max_bytes:
                break
            drop += 1
            freed += b
        c.execute("DELETE FROM cache WHERE key IN (SELECT key FROM cache ORDER BY last_used, created LIMIT ?)",
                  (drop,))
