"""API keys with roles, model patterns and limits.

Keys come from the config (``server.api_keys``: admin keys named by their reference;
``[keys.NAME]`` tables with a ``key`` reference and limits) and from the database
(``anyad keys create``, which prints a new key once and stores only its SHA-256). The
daemon watches the database (SQLite's ``data_version``, a read of shared memory, on each
request), so a key created, revoked or expired with the CLI counts at once, without a
restart. A key is looked up by its digest; no key is ever stored, logged or returned.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anyad.config import KeySettings
from anyad.secrets import resolve
from anyad.store import read_only

log = logging.getLogger("anyad.keys")

KEY_PREFIX = "ak-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(slots=True, frozen=True)
class Identity:
    """Who a request is from, and what that key may do."""

    name: str
    role: str = "admin"  # admin | user
    models: tuple[str, ...] = ()  # glob patterns over model names; empty: all
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None
    expires: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)

    @property
    def limited(self) -> bool:
        return bool(self.tokens_per_day or self.tokens_per_month)


# Without any key configured or created, every request is this one (loopback only).
ANONYMOUS = Identity("anonymous")


def from_settings(name: str, ks: KeySettings) -> Identity:
    return Identity(name, ks.role, tuple(ks.models), ks.tokens_per_day, ks.tokens_per_month,
                    ks.requests_per_minute, ks.expires.timestamp() if ks.expires else None)


class KeyRing:
    """Every key in force: the config's (resolved once) and the database's (kept current)."""

    def __init__(self, admin_refs: list[str], tables: dict[str, KeySettings], db_path: Path | None) -> None:
        self.static: dict[str, Identity] = {}
        for ref in admin_refs:
            self.static[digest(resolve(ref))] = Identity(ref)
        for name, ks in tables.items():
            self.static[digest(resolve(ks.key))] = from_settings(name, ks)
        self.db_path = db_path
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None
        self._next_try = 0.0
        self.dynamic: dict[str, Identity] = {}
        self._revoked: set[str] = set()

    def refresh(self) -> None:
        """Re-read the database's keys when another connection changed the file (once per
        request, before ``has_keys`` and ``identify``)."""
        if self.db_path is None:
            return
        if self._conn is None:
            now = time.monotonic()
            if now < self._next_try or not self.db_path.exists():
                self._next_try = now + 1.0
                return
            try:
                self._conn = read_only(self.db_path, timeout=5.0, check_same_thread=False)
            except sqlite3.Error:
                self._next_try = now + 1.0
                return
        try:
            (version,) = self._conn.execute("PRAGMA data_version").fetchone()
            if version == self._version:
                return
            rows = self._conn.execute("SELECT name, hash, role, models, tokens_per_day, tokens_per_month, "
                                      "requests_per_minute, expires, revoked FROM api_keys").fetchall()
        except sqlite3.Error:  # the table is not there yet (an older file): no keys from it
            self._version = None
            return
        import json

        dynamic, revoked = {}, set()
        for name, h, role, models, tpd, tpm, rpm, expires, rev in rows:
            if rev is not None:
                revoked.add(h)
                continue
            dynamic[h] = Identity(name, role, tuple(json.loads(models or "[]")), tpd, tpm, rpm, expires)
        self.dynamic, self._revoked, self._version = dynamic, revoked, version

    @property
    def has_keys(self) -> bool:
        """Whether requests need a key: some key exists, or existed. A revoked or expired key
        keeps the daemon locked: revoking the last key must not open it to everyone (the
        owner unlocks it on purpose with ``anyad keys unlock``)."""
        return bool(self.static or self.dynamic or self._revoked)

    def identify(self, token: str) -> Identity | None:
        """The key's identity, or None for an unknown, revoked or expired key."""
        h = digest(token)
        ident = self.static.get(h) or self.dynamic.get(h)
        if ident is None or (ident.expires is not None and ident.expires <= time.time()):
            return None
        return ident

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
