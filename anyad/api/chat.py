"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
import os
import time
from contextlib import aclosing

from aiohttp import web

from anyad.encoders import DONE, OpenAIEncoder, Reply, sse_error
from anyad.errors import AnyadError, BackendError, InvalidRequest
from anyad.jsoncodec import dumpb
from anyad.cache import Decision, Replayed, replay
from anyad.config import ServerSettings
from anyad.router import Opened, fallback_header
from anyad.schemas import parse_chat_request
from anyad.daemon import Daemon
from anyad.server import BACKEND, CONTENT, DAEMON, MODEL, REQUEST_ID, read_json
from anyad.store import CONVERSATION_ID, Exchange
from anyad.stream import ChatRequest, Usage, content_text

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


CONVERSATION_HEADER = "X-Anyad-Conversation-Id"


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


async def _open(daemon: Daemon, chat: ChatRequest, decision: Decision | None) -> tuple[Opened | Replayed, str | None]:
    """The reply's beginning, and what the cache had to do with it: a fresh cached answer,
    else the route's first target that answers, else (all failed) an expired cached one."""
    cache = daemon.cache
    if cache is None or decision is None:
        return await daemon.router.open(chat), None
    if decision.lookup and (entry := await cache.get(decision.key)) is not None:
        return replay(entry), "hit"
    try:
        return await daemon.router.open(chat), decision.header
    except AnyadError as exc:
        if not exc.retryable or (entry := await cache.get(decision.key, stale_ok=True)) is None:
            raise
        log.warning("every target for %s failed (%s); answering from an expired cache entry", chat.model,
                    exc.message)
        return replay(entry), "stale"


def check_caps(chat: ChatRequest, server: ServerSettings) -> None:
    """The server's caps on one request: how many messages, how much text."""
    if len(chat.messages) > server.max_messages:
        raise InvalidRequest(f"messages: {len(chat.messages)} messages; this server takes at most "
                             f"{server.max_messages} (server.max_messages)", param="messages")
    chars = sum(len(content_text(m.get("content"))) for m in chat.messages)
    if chars > server.max_prompt_chars:
        raise InvalidRequest(f"messages: {chars} characters of text; this server takes at most "
                             f"{server.max_prompt_chars} (server.max_prompt_chars)", param="messages")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    chat = parse_chat_request(await read_json(request))
    request[MODEL] = chat.model
    check_caps(chat, daemon.settings.server)
    history = daemon.history
    conv_id = conversation_id(request) if history is not None else None
    decision = daemon.cache.decide(chat, request) if daemon.cache is not None else None
    started, t0 = time.time(), time.monotonic()
    # The router waits for a target's first chunk before we answer: until then a
    # failure can still fall back, or get its own HTTP status.
    opened, cached = await _open(daemon, chat, decision)
    ttft_ms = (time.monotonic() - t0) * 1000
    request[BACKEND] = opened.name
    metrics = daemon.metrics
    metrics.first_chunk(opened.name, ttft_ms / 1000)
    if cached is not None:
        metrics.cache_result(cached)
    headers = {"X-Anyad-Backend": opened.name, "X-Request-Id": request[REQUEST_ID]}
    if opened.skipped:
        headers["X-Anyad-Fallback"] = fallback_header(opened.skipped)
    if cached is not None:
        headers["X-Anyad-Cache"] = cached
    if conv_id is not None:
        headers[CONVERSATION_HEADER] = conv_id
    enc = OpenAIEncoder(opened.name, include_usage=chat.include_usage)
    reply = Reply()
    outcome = "cancelled"  # unless the reply ends, or fails
    try:
        async with aclosing(opened.rest) as rest:
            if not chat.stream:
                reply.add(opened.first)
                try:
                    async for chunk in rest:
                        reply.add(chunk)
                except AnyadError as exc:
                    outcome = "error"
                    opened.failed(exc)
                    raise
                if reply.finish_reason is None:
                    outcome = "error"
                    raise BackendError(f"{opened.name} ended the reply without a finish reason")
                outcome = reply.finish_reason
                return web.Response(body=dumpb(enc.completion(reply)), headers=headers,
                                    content_type="application/json")

            resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await resp.prepare(request)
            finish: bytes = b""
            try:
                out = [enc.role()]  # the role goes out with the first piece, in one write
                chunk = opened.first
                while chunk is not None:
                    reply.add(chunk)
                    if chunk.text or chunk.tool_calls or chunk.extra:
                        out.append(enc.chunk(chunk))
                    if chunk.finish_reason and not finish:
                        # Held back until the stream ends (the usage chunk and [DONE] follow at
                        # once), so the tail of the reply is one write.
                        finish = enc.finish(chunk.finish_reason)
                    if out:
                        await resp.write(b"".join(out))
                        out = []
                    chunk = await anext(rest, None)
                if not finish:
                    raise BackendError(f"{opened.name} ended the reply without a finish reason")
                tail = [finish]
                if chat.include_usage:
                    tail.append(enc.usage(reply.usage or Usage()))
                tail.append(DONE)
                await resp.write(b"".join(tail))
                outcome = reply.finish_reason or "stop"
            except AnyadError as exc:
                outcome = "error"
                opened.failed(exc)
                # Headers are gone already: report in-band, as OpenAI does, and end without [DONE].
                log.warning("request %s: stream failed: %s", request[REQUEST_ID], exc.message)
                try:
                    await resp.write(sse_error(exc.body()))
                except ConnectionError:
                    pass
            except ConnectionError:
                # The client went away; closing the stream cancels generation.
                log.info("request %s: client disconnected mid-stream", request[REQUEST_ID])
            return resp
    finally:
        if reply.usage is not None and cached not in ("hit", "stale"):
            metrics.usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
        if daemon.audit is not None and daemon.audit.settings.include_content:
            request[CONTENT] = {"messages": chat.messages, "reply": reply.message()}
        if decision is not None and decision.store and cached in ("miss", "bypass") \
                and outcome not in ("cancelled", "error"):
            daemon.cache.put(decision.key, chat.model, opened.name, reply.message(), outcome, reply.usage)
        if history is not None:
            history.record(Exchange(
                conversation_id=conv_id, request_id=request[REQUEST_ID], model=chat.model,
                backend=opened.name, stream=chat.stream, cache=cached, messages=chat.messages,
                reply=reply.message(), finish_reason=outcome,
                prompt_tokens=reply.usage.prompt_tokens if reply.usage else None,
                completion_tokens=reply.usage.completion_tokens if reply.usage else None,
                started=started, latency_ms=(time.monotonic() - t0) * 1000, ttft_ms=ttft_ms))
