"""The framed protocol between the daemon and a model's worker process.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON, one object per frame. The daemon writes to the worker's stdin and reads
its stdout; the worker moves its own fd 1 to stderr first, so nothing a C
library prints can corrupt the stream. The protocol is internal and versioned
with the package: the worker's ``hello`` frame carries ``PROTOCOL_VERSION``.

daemon → worker: ``{"op": "load", "version", "path", "n_ctx", "n_threads", "n_batch", "n_gpu_layers",
"main_gpu", "parallel", "warm_up", "tool_format", "reasoning", "repack", "flash_attention"}`` (first),
``{"op": "chat", "id", "messages", "params"}`` (params: ``SamplingParams.as_dict()``, tools included),
``{"op": "embed", "id", "input"}``, ``{"op": "count", "id", "messages", "params"}`` (answered by
``{"t": "end", "id", "tokens"}``), ``{"op": "stats", "id"}``,
``{"op": "cancel", "id"}``, ``{"op": "shutdown"}``.
worker → daemon: ``{"t": "hello", "version", "pid"}``, ``{"t": "ready", ...model facts}``,
``{"t": "delta", "id", "text"?, "reasoning"?, "tool_calls"?, "logprobs"?}`` (tool_calls: OpenAI's deltas;
logprobs: OpenAI's ``logprobs.content`` entries of the tokens since the last frame),
``{"t": "finish", "id", "index"?, "finish_reason", "note"?}`` (the end of one of ``n`` choices but
the last; delta frames carry the ``index`` of their choice, absent for the first),
``{"t": "end", "id", "index"?, "finish_reason", "usage", "note"?, "tokens"?}`` (the last choice's end,
the usage of all; finish_reason "tool_calls" after parsed calls; note: why the model's tool call was
returned as text; tokens: the prompt's and reply's token ids, when params asked ``return_tokens``;
params' ``context``: token ids the prompt goes on from), ``{"t": "error", "id", "code", "message"}``,
``{"t": "fatal", "message"}``.
"""

from __future__ import annotations

import struct
from typing import IO, TYPE_CHECKING, Any

from anyad.jsoncodec import dumpb, loads

if TYPE_CHECKING:  # the worker never needs asyncio, and importing it costs its start time
    import asyncio

PROTOCOL_VERSION = 4
_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def encode(obj: dict[str, Any]) -> bytes:
    body = dumpb(obj)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Next frame; raises ``asyncio.IncompleteReadError`` when the worker is gone."""
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the limit")
    return loads(await reader.readexactly(n))


def read_frame_sync(f: IO[bytes]) -> dict[str, Any] | None:
    """Blocking read for the worker side; None at end of input (the daemon is gone)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    body = f.read(n)
    if len(body) < n:
        return None
    return loads(body)


def write_frame_sync(f: IO[bytes], obj: dict[str, Any]) -> None:
    f.write(encode(obj))
    f.flush()
