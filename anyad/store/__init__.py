"""The SQLite store: one file, ``anyad.db`` in the data directory, for the chat history,
the response cache (``anyad.cache``), stored responses, audit and usage rows and the
keys made at run time.

Writes go through a single writer, a process of its own (``writer``), that batches
them: a batch is one transaction, committed at most ``batch_interval_s`` after the item
was handed over, so a reply never waits on the disk. A ``kill -9`` of the daemon loses
at most what it had not sent yet (10 ms of items): the writer commits what it received,
then exits. WAL journaling with ``synchronous = NORMAL`` keeps the file consistent
through a crash.
Reads (the history API, the CLI, keys, quotas, usage, audit) use read-only connections
of their own (``connection.read_only``), which WAL lets run beside the writer.

- ``connection``: ``connect`` (the writing connection, migrated), ``read_only``,
  ``check_integrity``
- ``migrations``: the schema, as ordered named migrations
- ``rows``: what the writer is handed (``Exchange``, ``ResponseRow``, ``AuditRow``, ``UsageRow``)
- ``handle``: ``Store``, the daemon's reader and its way to the writer
- ``writer``: the one writer, a process of its own
- ``jobs``: what else the writer can be asked to do (``Store.submit``)
- ``history``: ``HistoryReader``, reading conversations
- ``search``: the full-text index of the messages
- ``responses``: stored responses (the Responses API's ``store``)
- ``usage``: usage reports from the ``usage`` table
"""

from __future__ import annotations

import sys

if "numpy" not in sys.modules:
    # sqlite-utils imports numpy when it can (to map numpy values to column types; anyad
    # stores none), and numpy, there for llama-cpp-python in the model workers, would add
    # a sixth of a second to the daemon's start. A later ``import numpy`` works as usual.
    sys.modules["numpy"] = None  # type: ignore[assignment]
    try:
        import sqlite_utils  # noqa: F401
    finally:
        del sys.modules["numpy"]

from anyad.store.connection import DB_NAME, check_integrity, connect, read_only
from anyad.store.handle import Store
from anyad.store.history import CONVERSATION_ID, MAX_QUERY_CHARS, HistoryReader
from anyad.store.rows import AUDIT_COLUMNS, AUDIT_INSERT, USAGE_COLUMNS, USAGE_INSERT, AuditRow, Exchange, UsageRow
from anyad.store.search import fts_query, index_pending

__all__ = ["AUDIT_COLUMNS", "AUDIT_INSERT", "CONVERSATION_ID", "DB_NAME", "MAX_QUERY_CHARS", "USAGE_COLUMNS",
           "USAGE_INSERT", "AuditRow", "Exchange", "HistoryReader", "Store", "UsageRow", "check_integrity", "connect",
           "fts_query", "index_pending", "read_only"]
