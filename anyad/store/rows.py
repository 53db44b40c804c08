"""The rows the daemon hands the store's writer: an exchange for the history, an audit or
usage row (plain tuples in their tables' column order, queued as they are)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Exchange:
    """One request and its reply, as the history records them."""

    conversation_id: str
    request_id: str
    model: str
    backend: str | None
    stream: bool
    cache: str | None  # hit | miss | bypass | stale; None when the cache is off
    messages: list[dict[str, Any]]  # as the client sent them
    reply: dict[str, Any] | None  # {"role": "assistant", "content", ...}; None when nothing came
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    started: float  # wall-clock seconds
    latency_ms: float
    ttft_ms: float | None
    owner: str | None = None  # the API key's name; the history shows a key only its own
    # Whether the exchange may go into another key's conversation (an admin key's may).
    any_conversation: bool = True


class AuditRow(tuple):
    """(at, actor, action, target, status, request_id, detail JSON): one row of the audit table."""

    __slots__ = ()


AUDIT_COLUMNS = "at, actor, action, target, status, request_id, detail"


class UsageRow(tuple):
    """(at, key, model, backend, endpoint, status, prompt_tokens, completion_tokens, cache, cost, request_id)."""

    __slots__ = ()


USAGE_COLUMNS = "at, key, model, backend, endpoint, status, prompt_tokens, completion_tokens, cache, cost, request_id"
AUDIT_INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
USAGE_INSERT = f"INSERT INTO usage ({USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
