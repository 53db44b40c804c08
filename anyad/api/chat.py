"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from anyad.encoders import DONE, OpenAIEncoder, Reply, sse_error
from anyad.errors import AnyadError, BackendError
from anyad.jsoncodec import dumpb
from anyad.router import fallback_header
from anyad.schemas import parse_chat_request
from anyad.server import DAEMON, REQUEST_ID, read_json
from anyad.stream import Usage

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    chat = parse_chat_request(await read_json(request))
    # The router waits for a target's first chunk before we answer: until then a
    # failure can still fall back, or get its own HTTP status.
    opened = await daemon.router.open(chat)
    headers = {"X-Anyad-Backend": opened.target.name, "X-Request-Id": request[REQUEST_ID]}
    if opened.skipped:
        headers["X-Anyad-Fallback"] = fallback_header(opened.skipped)
    enc = OpenAIEncoder(opened.target.name, include_usage=chat.include_usage)

    async with aclosing(opened.rest) as rest:
        if not chat.stream:
            reply = Reply()
            reply.add(opened.first)
            try:
                async for chunk in rest:
                    reply.add(chunk)
            except AnyadError as exc:
                opened.failed(exc)
                raise
            if reply.finish_reason is None:
                raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
            return web.Response(body=dumpb(enc.completion(reply)), headers=headers, content_type="application/json")

        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)
        usage: Usage | None = None
        finish: bytes = b""
        try:
            out = [enc.role()]  # the role goes out with the first piece, in one write
            chunk = opened.first
            while chunk is not None:
                if chunk.text or chunk.tool_calls or chunk.extra:
                    out.append(enc.chunk(chunk))
                if chunk.finish_reason and not finish:
                    # Held back until the stream ends (the usage chunk and [DONE] follow at
                    # once), so the tail of the reply is one write.
                    finish = enc.finish(chunk.finish_reason)
                if chunk.usage is not None:
                    usage = chunk.usage
                if out:
                    await resp.write(b"".join(out))
                    out = []
                chunk = await anext(rest, None)
            if not finish:
                raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
            tail = [finish]
            if chat.include_usage:
                tail.append(enc.usage(usage or Usage()))
            tail.append(DONE)
            await resp.write(b"".join(tail))
        except AnyadError as exc:
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
