"""Opening ``anyad.db``: the connection that writes (created and migrated if need be), the
read-only one every reader uses, and the check that refuses a damaged file."""

from __future__ import annotations

import logging
import sqlite3
import urllib.parse
from pathlib import Path

from sqlite_utils import Database

from anyad.errors import ConfigError
from anyad.store.migrations import migrate, schema_version

log = logging.getLogger("anyad.store")

DB_NAME = "anyad.db"


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """The database, created and brought to the current schema if need be: the daemon's
    writer and the commands that write (keys, secrets' audit rows) open it alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=check_same_thread, timeout=10)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    applied = migrate(Database(conn))
    if applied:
        log.info("database %s: applied %s (schema version %d)", path, ", ".join(applied),
                 schema_version(Database(conn)))
    return conn


def read_only(path: Path, *, timeout: float = 10.0, check_same_thread: bool = True,
              rows: bool = False) -> sqlite3.Connection:
    """A connection that only reads (``mode=ro``: it never creates the file, never writes,
    and WAL lets it read beside the writer, in this process or another).

    ``timeout``: how long to wait on a lock (the history and the CLI wait 10 s; the
    request path less). ``check_same_thread=False`` for a connection kept and used from
    other threads. ``rows``: rows as ``sqlite3.Row`` (by column name) instead of tuples."""
    # Quoted: a "?", "#" or "%" in the data directory's path would otherwise open another file.
    conn = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=timeout,
                           check_same_thread=check_same_thread)
    if rows:
        conn.row_factory = sqlite3.Row
    return conn


def check_integrity(path: Path) -> None:
    """Refuse a damaged database file (``PRAGMA quick_check``), naming it, before anything
    reads or writes it: SQLite itself notices a bad page only when a query happens to touch it.
    Raises ``ConfigError``; a file that does not exist yet is fine."""
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(path, timeout=10)
        try:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:  # so damaged that the check cannot even run
        problems = [str(exc)]
    if problems != ["ok"]:
        first = " ".join(str(problems[0]).split())
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ConfigError(f"the database {path} is damaged: {first}{more}; restore it from a backup or move it "
                          "aside to start with an empty one")
