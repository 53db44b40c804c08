"""The database schema, as an ordered list of forward migrations.

Each migration is a function named ``mNNN_what`` that takes a sqlite-utils
``Database``; ``migrate`` applies, in order and each in its own transaction, the
ones not yet recorded in the ``_migrations`` table. Never edit one that has
shipped: add the next.
"""

from __future__ import annotations

import time
from typing import Callable

from sqlite_utils import Database

MIGRATIONS: list[Callable[[Database], None]] = []


def migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_history(db: Database) -> None:
    db.executescript("""
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            title TEXT,
            model TEXT,
            messages INTEGER NOT NULL DEFAULT 0,
            exchanges INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX idx_conversations_updated ON conversations (updated);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT,
            extra TEXT,            -- JSON: name, tool_calls, content parts other than text
            exchange_id INTEGER,   -- the exchange whose reply this is, for assistant replies
            created REAL NOT NULL,
            UNIQUE (conversation_id, seq)
        );
        CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            request_id TEXT,
            model TEXT,            -- as the client asked for it
            backend TEXT,          -- the target that answered
            stream INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            latency_ms REAL,
            ttft_ms REAL,
            finish_reason TEXT,
            started REAL,
            finished REAL
        );
        CREATE INDEX idx_exchanges_conversation ON exchanges (conversation_id);
    """)
    db.table("messages").enable_fts(["content"], fts_version="FTS5", create_triggers=True)


@migration
def m002_response_cache(db: Database) -> None:
    db.executescript("""
        CREATE TABLE cache (
            key TEXT PRIMARY KEY,  -- SHA-256 of the canonical request
            model TEXT,
            backend TEXT,          -- the target that answered
            reply TEXT NOT NULL,   -- JSON: message, finish_reason, usage
            bytes INTEGER NOT NULL,
            created REAL NOT NULL,
            last_used REAL NOT NULL,
            expires REAL NOT NULL,
            hits INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX idx_cache_last_used ON cache (last_used);
        ALTER TABLE exchanges ADD COLUMN cache TEXT;  -- hit | miss | bypass | stale
    """)


@migration
def m003_deferred_search_index(db: Database) -> None:
    """Index messages for search in the background instead of by trigger on every insert
    (two thirds of a recorded exchange's cost): ``search_index.last_id`` is the highest
    message id indexed; a deleted message leaves the index only if it was in it."""
    db.executescript("""
        DROP TRIGGER IF EXISTS messages_ai;
        DROP TRIGGER IF EXISTS messages_au;
        DROP TRIGGER IF EXISTS messages_ad;
        CREATE TABLE search_index (id INTEGER PRIMARY KEY CHECK (id = 1), last_id INTEGER NOT NULL);
        INSERT INTO search_index (id, last_id) VALUES (1, (SELECT coalesce(max(id), 0) FROM messages));
        CREATE TRIGGER messages_ad AFTER DELETE ON messages
        WHEN old.id <= (SELECT last_id FROM search_index WHERE id = 1)
        BEGIN
            INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        END;
    """)


@migration
def m004_audit(db: Database) -> None:
    """Who did what: admin actions (secrets, model loads, reloads) and, per request, who
    asked for which model and how it ended."""
    db.executescript("""
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,        -- wall-clock seconds
            actor TEXT,              -- an API key's reference, addr:<client>, cli:<user>, daemon
            action TEXT NOT NULL,    -- request, secret.set, model.load, config.reload, ...
            target TEXT,             -- the model, secret or file acted on
            status INTEGER,          -- HTTP status for requests
            request_id TEXT,
            detail TEXT              -- JSON
        );
        CREATE INDEX idx_audit_at ON audit (at);
    """)


@migration
def m005_keys_and_usage(db: Database) -> None:
    """Keys made at run time (only their SHA-256), one usage row per request that used a
    model, and who owns each conversation."""
    db.executescript("""
        CREATE TABLE api_keys (
            name TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,     -- SHA-256 of the key; the key itself is never stored
            role TEXT NOT NULL,            -- user | admin
            models TEXT,                   -- JSON list of glob patterns; empty: all
            tokens_per_day INTEGER,
            tokens_per_month INTEGER,
            requests_per_minute INTEGER,
            expires REAL,
            created REAL NOT NULL,
            revoked REAL
        );
        CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            key TEXT,                      -- the key's name; anonymous without keys
            model TEXT,                    -- as asked for
            backend TEXT,                  -- the target that answered
            endpoint TEXT,
            status INTEGER,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cache TEXT,
            cost REAL,                     -- in the providers' price unit, where a price is configured
            request_id TEXT
        );
        CREATE INDEX idx_usage_key_at ON usage (key, at);
        CREATE INDEX idx_usage_at ON usage (at);
        ALTER TABLE conversations ADD COLUMN owner TEXT;
    """)


@migration
def m006_responses(db: Database) -> None:
    """Responses kept for ``previous_response_id`` and ``GET /v1/responses/{id}``: each in the
    conversation of its exchange, so the history's deletion and retention take it too."""
    db.executescript("""
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            owner TEXT,                    -- the key's name; anonymous without keys
            created REAL NOT NULL,
            body TEXT NOT NULL,            -- the response object, as it was answered
            messages TEXT NOT NULL         -- the conversation through it, as chat messages
        );
        CREATE INDEX idx_responses_conversation ON responses (conversation_id);
    """)


@migration
def m007_response_items(db: Database) -> None:
    """The items a stored response was made from, each with an id (``GET
    /v1/responses/{id}/input_items``); NULL for a response kept before."""
    db.execute("ALTER TABLE responses ADD COLUMN items TEXT")


@migration
def m008_one_row_per_request(db: Database) -> None:
    """A request that has a usage row keeps its audit facts there too (who, how long, its
    content when asked for), instead of a second row in ``audit``: ``audited`` says the
    audit log shows it (the audit's retention clears it, and the content, from old rows)."""
    db.executescript("""
        ALTER TABLE usage ADD COLUMN actor TEXT;       -- as audit.actor
        ALTER TABLE usage ADD COLUMN ms REAL;          -- how long the request took
        ALTER TABLE usage ADD COLUMN detail TEXT;      -- JSON: the request's content, with include_content
        ALTER TABLE usage ADD COLUMN audited INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX idx_usage_audited_at ON usage (at) WHERE audited = 1;
    """)


def migrate(db: Database) -> list[str]:
    """Apply the migrations this database lacks; returns their names."""
    if "_migrations" not in db.table_names():
        db.table("_migrations").create({"name": str, "applied": float}, pk="name")
    done = {row["name"] for row in db.table("_migrations").rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.conn:
            fn(db)
            db.table("_migrations").insert({"name": fn.__name__, "applied": time.time()})
        applied.append(fn.__name__)
    return applied


def schema_version(db: Database) -> int:
    return db["_migrations"].count if "_migrations" in db.table_names() else 0
