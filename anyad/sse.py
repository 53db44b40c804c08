"""Server-sent events, read as they arrive and as leniently as real upstreams need.

Tolerates CRLF line ends, ``data:`` with or without the space, comment lines
(``: ping``) and a missing blank line at the very end. Events are yielded the
moment their blank line arrives: nothing is buffered beyond one event.
"""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import StreamReader


async def iter_lines(content: StreamReader) -> AsyncIterator[bytes]:
    buf = b""
    async for data in content.iter_any():
        buf += data
        start = 0
        while (i := buf.find(b"\n", start)) >= 0:
            yield buf[start:i].rstrip(b"\r")
            start = i + 1
        buf = buf[start:]
    if buf:
        yield buf.rstrip(b"\r")


async def sse_events(content: StreamReader) -> AsyncIterator[tuple[str | None, str]]:
    """(event name or None, data) for each event."""
    event: str | None = None
    data: list[str] = []
    async for line in iter_lines(content):
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value.decode("utf-8", errors="replace"))
        elif name == b"event":
            event = value.decode("utf-8", errors="replace")
    if data:
        yield event, "\n".join(data)
