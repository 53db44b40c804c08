"""The rows the daemon hands the store's writer: an exchange for the history, a stored
response, an audit or usage row (plain tuples in their tables' column order, queued as
they are)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


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

    def fields(self) -> tuple[Any, ...]:
        """Its fields in order, as a plain tuple: what travels to the writer (pickling a
        slotted dataclass runs Python code for each; a tuple of plain values does not)."""
        return (self.conversation_id, self.request_id, self.model, self.backend, self.stream, self.cache,
                self.messages, self.reply, self.finish_reason, self.prompt_tokens, self.completion_tokens,
                self.started, self.latency_ms, self.ttft_ms, self.owner, self.any_conversation)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept for the Responses API (``store``)."""

    id: str
    conversation_id: str
    owner: str | None
    body: dict[str, Any]  # the response object
    messages: list[dict[str, Any]]  # the conversation through this response (chat messages)
    # The items it was made from (the earlier responses' input and output, then its own input),
    # each with an id: what ``GET /v1/responses/{id}/input_items`` lists.
    items: list[dict[str, Any]]


@dataclass(slots=True)
class ResponseRow:
    """A stored response on its way to the writer, which turns it into JSON (off the event
    loop) and writes it with the exchanges of its batch, after them."""

    response: StoredResponse
    created: float
    # The exchange it is the reply of (queued before it): its conversation as the writer
    # settled it, which may be a new one (see ``Store._write_exchanges``).
    exchange: Exchange | None
    done: Callable[[], None] | None = None  # once written (or failed): the writer thread calls it


RESPONSE_INSERT = ("INSERT OR REPLACE INTO responses (id, conversation_id, owner, created, body, messages, items) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")


class AuditRow(tuple):
    """(at, actor, action, target, status, request_id, detail JSON): one row of the audit table."""

    __slots__ = ()


AUDIT_COLUMNS = "at, actor, action, target, status, request_id, detail"


class UsageRow(tuple):
    """(at, key, model, backend, endpoint, status, prompt_tokens, completion_tokens, cache, cost, request_id,
    actor, ms, detail JSON, audited): one row per request that used a model, which is also
    the request's row in the audit log when ``audited`` (1)."""

    __slots__ = ()


USAGE_COLUMNS = ("at, key, model, backend, endpoint, status, prompt_tokens, completion_tokens, cache, cost, "
                 "request_id, actor, ms, detail, audited")
AUDIT_INSERT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
USAGE_INSERT = f"INSERT INTO usage ({USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
