"""``POST /v1/embeddings``: OpenAI embeddings, from local GGUF models or providers."""

from __future__ import annotations

import base64
import sys
from array import array

from aiohttp import web

from anyad import embedflow
from anyad.jsoncodec import dumps
from anyad.request_context import REQUEST_ID, read_json
from anyad.router import fallback_header
from anyad.schemas import EmbeddingsRequest, validate


def _b64(vector: list[float]) -> str:
    a = array("f", vector)
    if sys.byteorder == "big":  # the wire format is little-endian float32
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode()


async def embeddings(request: web.Request) -> web.Response:
    req = validate(EmbeddingsRequest, await read_json(request))
    target, result, skipped = await embedflow.embed(request, req.model, req.inputs(), req.options())
    encode = _b64 if req.encoding_format == "base64" else (lambda v: v)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)],
        "model": target.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    headers = {"X-Anyad-Backend": target.name, "X-Request-Id": request[REQUEST_ID]}
    if skipped:
        headers["X-Anyad-Fallback"] = fallback_header(skipped)
    return web.json_response(body, headers=headers, dumps=dumps)
