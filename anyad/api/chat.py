"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing

from aiohttp import web

from anyad.encoders import DONE, OpenAIEncoder, Reply, sse_error
from anyad.errors import AnyadError, BackendError, InvalidRequest
from anyad.jsoncodec import dumpb
from anyad.router import fallback_header
from anyad.schemas import parse_chat_request
from anyad.server import DAEMON, REQUEST_ID, read_json
from anyad.store import CONVERSATION_ID, Exchange
from anyad.stream import Usage

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


CONVERSATION_HEADER = "X-Anyad-Conversation-Id"


def conversation_id(request: web.Request) -> str:
    """The conversation this request continues (its header), or a new one."""
    cid = request.headers.get(CONVERSATION_HEADER)
    if cid is None:
        return uuid.uuid4().hex
    if not CONVERSATION_ID.match(cid):
        raise InvalidRequest(f"{CONVERSATION_HEADER} must be 1-128 letters, digits, '_', '-', '.' or ':'",
                             param=CONVERSATION_HEADER)
    return cid


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    chat = parse_chat_request(await read_json(request))
    store = daemon.store
    conv_id = conversation_id(request) if store is not None else None
    started, t0 = time.time(), time.monotonic()
    # The router waits for a target's first chunk before we answer: until then a
    # failure can still fall back, or get its own HTTP status.
    opened = await daemon.router.open(chat)
    ttft_ms = (time.monotonic() - t0) * 1000
    headers = {"X-Anyad-Backend": opened.target.name, "X-Request-Id": request[REQUEST_ID]}
    if opened.skipped:
        headers["X-Anyad-Fallback"] = fallback_header(opened.skipped)
    if conv_id is not None:
        headers[CONVERSATION_HEADER] = conv_id
    enc = OpenAIEncoder(opened.target.name, include_usage=chat.include_usage)
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
                    raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
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
                    raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
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
        if store is not None:
            store.record(Exchange(
                conversation_id=conv_id, request_id=request[REQUEST_ID], model=chat.model,
                backend=opened.target.name, stream=chat.stream, messages=chat.messages,
                reply=reply.message(), finish_reason=outcome,
                prompt_tokens=reply.usage.prompt_tokens if reply.usage else None,
                completion_tokens=reply.usage.completion_tokens if reply.usage else None,
                started=started, latency_ms=(time.monotonic() - t0) * 1000, ttft_ms=ttft_ms))
