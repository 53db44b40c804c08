"""The response cache: answers worth reusing, in the same SQLite file as the history.

Key: a SHA-256 of the canonical request: the identity of every target the model name
resolves to (for a local model its file's path, size and modification time, so a new
file never answers from an old one's entries), the messages, and every field of the
body that can change the output (everything but how it is delivered: ``stream``,
``stream_options``, ``keep_alive``, ``user``). Only deterministic requests are cached by
default (``temperature`` 0 or a ``seed``). ``Cache-Control: no-cache`` skips the lookup,
``no-store`` the write. Entries expire after ``ttl_s``; beyond ``max_entries`` or
``max_bytes`` the least recently used go. An expired entry is still served, marked
``stale``, when every target of the request has failed.

Lookups read through their own connection off the event loop; writes (new entries and
the last-used time of hits) go through the store's writer, off the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from anyad.config import CacheSettings
from anyad.jsoncodec import dumpb, dumps, loads
from anyad.router import Target
from anyad.store import Store, jobs
from anyad.stream import ChatRequest, Chunk, ChunkStream, Usage

# Fields that change how a reply is delivered, not what it says.
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "keep_alive", "user"})


@dataclass(slots=True)
class Decision:
    lookup: bool  # may a fresh entry answer?
    store: bool  # may the reply be kept?
    _make_key: Callable[[], str]
    _key: str | None = None

    @property
    def key(self) -> str:
        # Made on first use: a request that is neither looked up nor kept needs it only
        # if every target fails (for a stale answer).
        if self._key is None:
            self._key = self._make_key()
        return self._key

    @property
    def header(self) -> str:
        return "miss" if self.lookup else "bypass"


@dataclass(slots=True)
class Entry:
    backend: str
    reply: dict[str, Any]  # the assistant message
    finish_reason: str
    usage: Usage
    fresh: bool


@dataclass(slots=True)
class Replayed:
    """A cached reply in the shape of a live one (``router.Opened``), for the same encoders."""

    name: str
    first: Chunk
    rest: ChunkStream
    skipped: list[str] = field(default_factory=list)

    def failed(self, exc: Exception) -> None:  # a replay has no breaker to tell
        pass


async def _chunks(chunks: list[Chunk]) -> ChunkStream:
    for c in chunks:
        yield c


def replay(entry: Entry) -> Replayed:
    msg = entry.reply
    extra = {k: v for k, v in msg.items() if k not in ("role", "content", "tool_calls", "refusal")} or None
    tool_calls = [{"index": i, **tc} for i, tc in enumerate(msg.get("tool_calls") or [])] or None
    body = Chunk(text=msg.get("content") or "", tool_calls=tool_calls, extra=extra)
    end = Chunk(finish_reason=entry.finish_reason, usage=entry.usage)
    return Replayed(entry.backend, body, _chunks([end]))


def cache_control(request: web.Request) -> set[str]:
    value = request.headers.get("Cache-Control", "")
    return {d.strip().lower().split("=", 1)[0] for d in value.split(",") if d.strip()}


class ResponseCache:
    def __init__(self, store: Store, settings: CacheSettings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock  # wall-clock seconds: entries outlive a restart

    @staticmethod
    def key(chat: ChatRequest, targets: list[Target]) -> str:
        """The request as it changes the answer: what the route's targets are (a replaced model
        file is another model) and every field of the body that is not about delivery."""
        # Once each: a pool's replicas are one identity, whichever order they come in.
        identity = list(dict.fromkeys(t.backend.identity(t.model) for t in targets))
        body = {k: v for k, v in chat.body.items() if k not in DELIVERY_FIELDS}
        return hashlib.sha256(dumpb({"targets": identity, "body": body})).hexdigest()

    def decide(self, chat: ChatRequest, request: web.Request, targets: list[Target]) -> Decision:
        directives = cache_control(request)
        p = chat.params
        deterministic = p.temperature == 0 or p.seed is not None
        # An entry keeps one message, without its log probabilities: a request for those, or
        # for several choices, is never answered from the cache (nor stored, so no stale
        # answer lacks them either).
        cacheable = (self.settings.mode == "all" or deterministic) and p.logprobs is None and chat.choices == 1
        return Decision(lookup=cacheable and "no-cache" not in directives,
                        store=cacheable and "no-store" not in directives, _make_key=lambda: self.key(chat, targets))

    async def get(self, key: str, *, stale_ok: bool = False) -> Entry | None:
        row = await asyncio.to_thread(self._read, key)
        if row is None:
            return None
        fresh = row["expires"] > self.clock()
        if not fresh and not stale_ok:
            return None
        used = self.clock()
        self.store.submit(jobs.cache_touch, used, key)
        data = loads(row["reply"])
        u = data["usage"]
        # The usage of the reply as it was made (what its engine reused included).
        return Entry(row["backend"], data["message"], data["finish_reason"],
                     Usage(u["prompt_tokens"], u["completion_tokens"],
                           (u.get("prompt_tokens_details") or {}).get("cached_tokens")), fresh)

    def _read(self, key: str) -> Any:
        conn = self.store.read_connection()
        try:
            return conn.execute("SELECT backend, reply, expires FROM cache WHERE key = ?", (key,)).fetchone()
        finally:
            conn.close()

    def put(self, key: str, model: str, backend: str, message: dict[str, Any], finish_reason: str,
            usage: Usage | None) -> None:
        reply = dumps({"message": message, "finish_reason": finish_reason,
                       "usage": (usage or Usage()).as_dict()})
        now = self.clock()
        s = self.settings
        self.store.submit(jobs.cache_put, key, model, backend, reply, now, s.ttl_s, s.max_entries, s.max_bytes)
