"""One embeddings request's way through the daemon, whatever door it came in by.

``embed`` does what every embeddings door needs besides its wire format: the key's
model patterns and quotas, the route (with fallback), and afterwards the metrics, the
quota count and the usage row (through the request keys the accounting middleware
reads). ``/v1/embeddings`` and the Ollama door's ``/api/embed`` and ``/api/embeddings``
call it.
"""

from __future__ import annotations

from aiohttp import web

from anyad.access import admit
from anyad.backend import Embeddings
from anyad.daemon import DAEMON
from anyad.request_context import BACKEND, MODEL, USAGE
from anyad.router import Target


async def embed(request: web.Request, model: str, inputs: list[str] | list[list[int]],
                options: dict[str, object] | None = None) -> tuple[Target, Embeddings, list[str]]:
    """(the target that answered, its vectors and token count, the targets skipped)."""
    daemon = request.app[DAEMON]
    request[MODEL] = model
    ident = admit(request, model, daemon.quotas)
    target, result, skipped = await daemon.router.embed(model, inputs, options)
    request[BACKEND] = target.name
    request[USAGE] = (result.prompt_tokens, 0, None)
    daemon.metrics.usage(result.prompt_tokens, None)
    daemon.quotas.add(ident, result.prompt_tokens)
    return target, result, skipped
