"""The audit log: who did what, in the ``audit`` table of ``anyad.db``.

Admin actions (secrets set or deleted, models loaded and unloaded, config reloaded or
refused) are always recorded while ``audit.enabled``; each API request too when
``audit.requests`` (who: the API key's reference, or the client's address without keys;
which model; the status), with its messages and reply only when
``audit.include_content``. No secret value is ever written: actors are references.

A request that has a usage row has one row only: its audit facts (who, how long, the
content) are kept in that ``usage`` row, marked ``audited``; ``read()`` shows both tables'
rows as one log.

In the daemon rows go through the store's writer, batched with the history; the
CLI (``anyad secrets``) writes its own row straight to the file.
"""

from __future__ import annotations

import getpass
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from anyad.config import AuditSettings
from anyad.jsoncodec import dumps, loads
from anyad.store import AUDIT_COLUMNS, DB_NAME, AuditRow, Store, connect, jobs, read_only

log = logging.getLogger("anyad.audit")


def cli_actor() -> str:
    try:
        return "cli:" + getpass.getuser()
    except Exception:  # no user name (a container's odd uid)
        return "cli:?"


class AuditLog:
    def __init__(self, store: Store, settings: AuditSettings) -> None:
        self.store = store
        self.settings = settings

    def action(self, actor: str, action: str, target: str | None = None, detail: dict[str, Any] | None = None,
               status: int | None = None) -> None:
        self.store.audit(AuditRow((time.time(), actor, action, target, status, None,
                                   dumps(detail) if detail else None)))

    def request(self, actor: str, endpoint: str, model: str | None, backend: str | None, status: int,
                request_id: str, seconds: float, content: dict[str, Any] | None = None) -> None:
        detail: dict[str, Any] = {"endpoint": endpoint, "ms": round(seconds * 1000, 1)}
        if backend:
            detail["backend"] = backend
        if content is not None and self.settings.include_content:
            detail["content"] = content
        self.store.audit(AuditRow((time.time(), actor, "request", model, status, request_id, dumps(detail))))

    def content(self, content: dict[str, Any] | None) -> str | None:
        """A request's content for its row (JSON), when the settings keep it."""
        return dumps({"content": content}) if content is not None and self.settings.include_content else None

    def model_event(self, event: str, model: str, detail: dict[str, Any]) -> None:
        """A scheduler event (``anyad.scheduler.Scheduler.listeners``)."""
        self.action("daemon", event, model, detail)

    def apply_retention(self) -> Any:
        cutoff = time.time() - self.settings.max_age_days * 86400
        return self.store.submit(jobs.audit_retention, cutoff)


def record_offline(data_dir: Path, actor: str, action: str, target: str | None = None,
                   detail: dict[str, Any] | None = None) -> None:
    """One admin row written by a command outside the daemon (the CLI); WAL lets it go in
    beside a running daemon's writer."""
    conn = connect(data_dir / DB_NAME)
    try:
        with conn:
            conn.execute(f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (time.time(), actor, action, target, None, None, dumps(detail) if detail else None))
    finally:
        conn.close()


def read(path: Path, *, limit: int = 50, action: str | None = None) -> Iterator[dict[str, Any]]:
    """The newest rows first: the ``audit`` table's, and the requests whose one row is in
    ``usage`` (``audited``), in the same shape."""
    conn = read_only(path, timeout=10, rows=True)
    try:
        where, args = ("WHERE action = ?", [action]) if action else ("", [])
        rows = [dict(r) for r in conn.execute(
            f"SELECT at, actor, action, target, status, request_id, detail FROM audit {where} "
            "ORDER BY at DESC, id DESC LIMIT ?", [*args, limit])]
        if action in (None, "request"):
            try:
                requests = conn.execute(
                    "SELECT at, actor, model, backend, endpoint, status, request_id, ms, detail FROM usage "
                    "WHERE audited = 1 ORDER BY at DESC, id DESC LIMIT ?", [limit]).fetchall()
            except sqlite3.OperationalError:  # a database from before usage rows were audited
                requests = []
            for r in requests:
                detail: dict[str, Any] = {"endpoint": r["endpoint"], "ms": r["ms"]}
                if r["backend"]:
                    detail["backend"] = r["backend"]
                if r["detail"]:
                    detail.update(loads(r["detail"]))
                rows.append({"at": r["at"], "actor": r["actor"], "action": "request", "target": r["model"],
                             "status": r["status"], "request_id": r["request_id"], "detail": dumps(detail)})
    finally:
        conn.close()
    rows.sort(key=lambda r: r["at"], reverse=True)
    yield from rows[:limit]
