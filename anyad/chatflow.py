"""One chat request's way through the daemon, whatever wire format it came in.

``ChatFlow`` does everything between parsing and encoding: the server's caps, the
plugins' guards, the conversation id, the response cache (lookup, and the expired
answer as a last resort), the route's walk to a first chunk, and after the reply the
cache write, the history, the metrics and the ``after_reply`` plugins; and between
them the streaming loop itself (``respond``). A door (``anyad.api.chat``, the Ollama
listener's ``plugins/ollama.py``, any to come) only turns its wire request into a
``ChatRequest`` and supplies a ``ReplyWriter`` that turns chunks into its own bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from contextlib import aclosing
from typing import Callable, Protocol

from aiohttp import web

from anyad.access import admit
from anyad.cache import Decision, Replayed, replay
from anyad.config import ServerSettings
from anyad.daemon import Daemon
from anyad.encoders import Reply
from anyad.errors import AnyadError, BackendError, Forbidden, InvalidRequest
from anyad.hookspecs import ExchangeRecord
from anyad.modelops import check_keep_alive
from anyad.pool import prompt_key
from anyad.request_context import BACKEND, CONTENT, MODEL, REQUEST_ID, USAGE, identity
from anyad.router import Opened, Target, fallback_header
from anyad.store import CONVERSATION_ID, Exchange, Store
from anyad.stream import ChatRequest, Chunk, ChunkStream, content_text

log = logging.getLogger("anyad.chat")

CONVERSATION_HEADER = "X-Anyad-Conversation-Id"
TOOL_PARSE_HEADER = "X-Anyad-Tool-Parse"  # why a tool call the model wrote came back as text


def new_conversation_id() -> str:
    """32 hex digits, time-ordered (milliseconds, then 80 random bits, as UUIDv7 does): new
    conversations land at the end of the database's indexes instead of all over them."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def conversation_id(request: web.Request) -> str:
    """The conversation this request continues (its header), or a new one."""
    cid = request.headers.get(CONVERSATION_HEADER)
    if cid is None:
        return new_conversation_id()
    if not CONVERSATION_ID.match(cid):
        raise InvalidRequest(f"{CONVERSATION_HEADER} must be 1-128 letters, digits, '_', '-', '.' or ':'",
                             param=CONVERSATION_HEADER)
    return cid


async def writable_conversation(history: Store, request: web.Request) -> str:
    """The conversation this request's exchange goes into: as ``conversation_id``, but a key
    may add only to its own conversations (admin keys to any), as it may read only those."""
    cid = conversation_id(request)
    ident = identity(request)
    if ident.admin or CONVERSATION_HEADER not in request.headers:
        return cid
    exists, owner = await asyncio.to_thread(history.owner, cid)
    if not exists:  # not written yet: the first key to use the id holds it, even mid-reply
        owner = history.claim(cid, ident.name)
    if owner != ident.name:
        raise Forbidden(f"the conversation {cid!r} belongs to another key; continue one of your own, or send "
                        f"no {CONVERSATION_HEADER} to start a new one", param=CONVERSATION_HEADER,
                        code="conversation_not_owned")
    return cid


def route_key(request: web.Request, continues: str | None = None) -> str:
    """Who a request is from, for a weighted route's sticky assignment: the conversation it
    continues (``continues``: as its door found it), else its API key (as a digest), else
    the client's address."""
    cid = continues or request.headers.get(CONVERSATION_HEADER)
    if cid:
        return "conversation:" + cid
    auth = request.headers.get("Authorization")
    if auth:
        return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:32]
    return "addr:" + (request.remote or "")


def check_caps(chat: ChatRequest, server: ServerSettings) -> None:
    """The server's caps on one request: how many messages, how much text."""
    if len(chat.messages) > server.max_messages:
        raise InvalidRequest(f"messages: {len(chat.messages)} messages; this server takes at most "
                             f"{server.max_messages} (server.max_messages)", param="messages")
    chars = sum(len(content_text(m.get("content"))) for m in chat.messages)
    if chars > server.max_prompt_chars:
        raise InvalidRequest(f"messages: {chars} characters of text; this server takes at most "
                             f"{server.max_prompt_chars} (server.max_prompt_chars)", param="messages")


class ReplyWriter(Protocol):
    """A door's wire format for replies; ``ChatFlow.respond`` does the rest."""

    stream_headers: dict[str, str]  # of a streamed reply (its Content-Type at least)

    def head(self) -> bytes:
        """What a stream starts with, sent with the first piece (b"": nothing)."""

    def piece(self, chunk: Chunk) -> bytes:
        """One chunk on the wire (b"": nothing to send for it)."""

    def tail(self, flow: "ChatFlow") -> bytes:
        """What a stream ends with, once the reply ran to its end."""

    def error(self, exc: AnyadError) -> bytes:
        """A failure after the stream began, reported in-band."""

    def whole(self, flow: "ChatFlow") -> bytes:
        """A non-streamed reply's JSON body."""


class ChatFlow:
    """Use: ``opened = await flow.open()``, then ``return await flow.respond(opened, writer)``.

    A door that needs the reply as a whole for itself calls ``await flow.collect(rest)``
    instead, and ``flow.finish()`` in a ``finally``."""

    def __init__(self, daemon: Daemon, request: web.Request, chat: ChatRequest,
                 continues: str | None = None) -> None:
        """``continues``: the conversation this request goes on with, as its door found it (a
        stored response's), its owner checked; else the conversation header's, or a new one."""
        self.daemon = daemon
        self.continues = continues
        # Called at the end of ``finish`` when the reply ran to its end (after the history's
        # write is queued): a door's own records of the reply.
        self.after: list[Callable[[ChatFlow], None]] = []
        self.request = request
        self.chat = chat
        self.reply = Reply()
        # One reply per choice (``n``); the first is ``reply``, which also gathers the usage and
        # is the one the history, the cache and the plugins see.
        self.choices = [self.reply]
        self.opened: Opened | Replayed | None = None
        self.cached: str | None = None
        self.conversation_id: str | None = None
        self.exchange: Exchange | None = None  # the history's record of it, once queued (``finish``)
        self.decision: Decision | None = None
        self.targets: list[Target] = []
        self.started = time.time()
        self.t0 = time.monotonic()
        self.ttft_ms: float | None = None
        self.headers: dict[str, str] = {}
        self.outcome = "cancelled"  # unless the reply ends (its finish reason) or fails ("error")
        self._chunk_hooks = daemon.plugins.stream_chunk
        request[MODEL] = chat.model

    async def open(self) -> Opened | Replayed:
        """Everything up to the reply's first chunk; raises the AnyadError to answer with."""
        daemon, request = self.daemon, self.request
        check_caps(self.chat, daemon.settings.server)
        # Access first: a request the key may not make (its model, its quota) is refused before
        # any plugin sees it; then the model a plugin's rewrite asks for is held to the same rule.
        admit(request, self.chat.model, daemon.quotas)
        if daemon.plugins.before_request:
            asked = self.chat.model
            self.chat = await daemon.plugins.guard("anyad_before_request", self.chat, "request",
                                                   endpoint=request.path, daemon=daemon)
            request[MODEL] = self.chat.model
            if self.chat.model != asked:
                admit(request, self.chat.model)
        check_keep_alive(daemon, request, self.chat.model, self.chat.keep_alive)
        if daemon.history is not None:
            self.conversation_id = self.continues or await writable_conversation(daemon.history, request)
        pool_key = None
        if daemon.router.keyed:
            self.chat.route_key = route_key(request, self.continues)
            # A pool keeps a conversation where its prefix is cached: one without a name of
            # its own is known by how it began (not by its key: one app's key carries all its
            # conversations, which would all share one home).
            if self.chat.model in daemon.router.pooled:  # hashing the prompt is for pools only
                pool_key = self.chat.route_key if self.chat.route_key.startswith("conversation:") \
                    else prompt_key(self.chat.messages)
        # Resolved once: the cache key and the walk see the same targets (a weighted route's
        # pick and a pool's order included).
        self.targets = daemon.router.resolve(self.chat.model, self.chat.route_key, pool_key)
        if daemon.cache is not None:
            self.decision = daemon.cache.decide(self.chat, request, self.targets)
        # The router waits for a target's first chunk before we answer: until then a
        # failure can still fall back, or get its own HTTP status.
        self.opened, self.cached = await self._open()
        opened = self.opened
        self.ttft_ms = (time.monotonic() - self.t0) * 1000
        request[BACKEND] = opened.name
        metrics = daemon.metrics
        metrics.first_chunk(opened.name, self.ttft_ms / 1000)
        headers = self.headers
        headers["X-Anyad-Backend"] = opened.name
        headers["X-Request-Id"] = request[REQUEST_ID]
        if opened.skipped:
            headers["X-Anyad-Fallback"] = fallback_header(opened.skipped)
        if self.cached is not None:
            metrics.cache_result(self.cached)
            headers["X-Anyad-Cache"] = self.cached
        if self.conversation_id is not None:
            headers[CONVERSATION_HEADER] = self.conversation_id
        return opened

    async def _open(self) -> tuple[Opened | Replayed, str | None]:
        """The reply's beginning, and what the cache had to do with it: a fresh cached answer,
        else the route's first target that answers, else (all failed) an expired cached one."""
        daemon, chat, decision = self.daemon, self.chat, self.decision
        cache = daemon.cache
        if cache is None or decision is None:
            return await daemon.router.open(chat, self.targets), None
        if decision.lookup and (entry := await cache.get(decision.key)) is not None:
            return replay(entry), "hit"
        try:
            return await daemon.router.open(chat, self.targets), decision.header
        except AnyadError as exc:
            if not exc.retryable or (entry := await cache.get(decision.key, stale_ok=True)) is None:
                raise
            log.warning("every target for %s failed (%s); answering from an expired cache entry", chat.model,
                        exc.message)
            return replay(entry), "stale"

    def take(self, chunk: Chunk) -> Chunk:
        """A chunk on its way out: the plugins may change it, the reply keeps it."""
        if self._chunk_hooks:
            chunk = self.daemon.plugins.chunk(chunk, self.chat, self.opened.name if self.opened else "")
        if not chunk.index:
            self.reply.add(chunk)
            return chunk
        if not 0 < chunk.index < self.chat.choices:
            raise BackendError(f"{self.opened.name if self.opened else '?'} answered with a choice "
                               f"(index {chunk.index}) that was not asked for")
        while len(self.choices) <= chunk.index:
            self.choices.append(Reply())
        self.choices[chunk.index].add(chunk)
        if chunk.usage is not None:
            self.reply.usage = chunk.usage
        return chunk

    async def respond(self, opened: Opened | Replayed, writer: ReplyWriter) -> web.StreamResponse:
        """The whole answer in the writer's wire format: streamed (a client that goes away
        cancels generation; a failure mid-stream goes in-band) or as one body."""
        request = self.request
        try:
            async with aclosing(opened.rest) as rest:
                if not self.chat.stream:
                    await self.collect(rest)
                    return web.Response(body=writer.whole(self), headers=self.headers,
                                        content_type="application/json")
                resp = web.StreamResponse(headers={**writer.stream_headers, **self.headers})
                await resp.prepare(request)
                try:
                    head = writer.head()
                    out = [head] if head else []  # the head goes out with the first piece, in one write
                    chunk: Chunk | None = opened.first
                    while chunk is not None:
                        piece = writer.piece(self.take(chunk))
                        if piece:
                            out.append(piece)
                        if out:
                            await resp.write(b"".join(out))
                            out = []
                        chunk = await anext(rest, None)
                    self.check_finished()
                    self.ended()
                    await resp.write(writer.tail(self))
                except AnyadError as exc:
                    self.failed(exc)
                    try:  # the headers are gone already
                        await resp.write(writer.error(exc))
                    except ConnectionError:
                        pass
                except ConnectionError:
                    # The client went away; closing the stream cancels generation.
                    log.info("request %s: client disconnected mid-stream", request[REQUEST_ID])
                return resp
        finally:
            self.finish()

    async def collect(self, rest: ChunkStream) -> Reply:
        """A whole (non-streamed) reply: the first chunk and the rest, taken in turn."""
        assert self.opened is not None
        self.take(self.opened.first)
        try:
            async for chunk in rest:
                self.take(chunk)
            self.check_finished()
        except AnyadError as exc:
            self.failed(exc)
            raise
        self.ended()
        if self.reply.note:  # a whole reply's headers are still to be sent
            self.headers[TOOL_PARSE_HEADER] = self.reply.note
        return self.reply

    def ended(self) -> None:
        """The reply ran to its end."""
        self.outcome = self.reply.finish_reason or "stop"

    def failed(self, exc: AnyadError) -> None:
        """The reply broke after it began."""
        self.outcome = "error"
        if self.opened is not None:
            self.opened.failed(exc)
        log.warning("request %s: reply from %s failed: %s", self.request[REQUEST_ID],
                    self.opened.name if self.opened else "?", exc.message)

    def check_finished(self) -> None:
        asked = self.chat.choices
        if len(self.choices) < asked:
            raise BackendError(f"{self.opened.name if self.opened else '?'} answered {len(self.choices)} of the "
                               f"{asked} choices asked for")
        if any(r.finish_reason is None for r in self.choices):
            raise BackendError(f"{self.opened.name if self.opened else '?'} ended the reply without a "
                               "finish reason")

    def finish(self) -> None:
        """After the reply (whole, cut off by the client, or failed): cache, history,
        metrics, audit content, plugins. Nothing here waits on the disk."""
        daemon, chat, reply, opened, cached = self.daemon, self.chat, self.reply, self.opened, self.cached
        outcome = self.outcome
        if opened is None:
            return
        usage = reply.usage
        if usage is not None:
            self.request[USAGE] = (usage.prompt_tokens, usage.completion_tokens, cached)
            if cached not in ("hit", "stale"):  # an answer from the cache cost nothing
                daemon.metrics.usage(usage.prompt_tokens, usage.completion_tokens, opened.name)
                daemon.quotas.add(identity(self.request), usage.total_tokens)
        if daemon.audit is not None and daemon.audit.settings.include_content:
            self.request[CONTENT] = {"messages": chat.messages, "reply": reply.message()}
        decision, cache = self.decision, daemon.cache  # a decision is made only with a cache
        if decision is not None and cache is not None and decision.store and cached in ("miss", "bypass") \
                and outcome not in ("cancelled", "error"):
            cache.put(decision.key, chat.model, opened.name, reply.message(), outcome, usage)
        latency_ms = (time.monotonic() - self.t0) * 1000
        history = daemon.history
        # The conversation was chosen in open() when the history was on (a reload may turn it on since).
        if history is not None and self.conversation_id is not None:
            history.record(exchange := Exchange(
                conversation_id=self.conversation_id, request_id=self.request[REQUEST_ID], model=chat.model,
                backend=opened.name, stream=chat.stream, cache=cached, messages=chat.messages,
                reply=reply.message(), finish_reason=outcome,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                started=self.started, latency_ms=latency_ms, ttft_ms=self.ttft_ms,
                owner=identity(self.request).name, any_conversation=identity(self.request).admin))
            self.exchange = exchange
        if daemon.plugins.after_reply:
            record = ExchangeRecord(chat, self.request.path, self.request[REQUEST_ID], opened.name,
                                    reply.message(), outcome, usage, cached, self.conversation_id,
                                    latency_ms / 1000)
            daemon.spawn(daemon.plugins.notify("anyad_after_reply", exchange=record))
        if outcome not in ("cancelled", "error"):
            for after in self.after:
                after(self)
