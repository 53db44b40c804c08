"""Server-sent events, read as they arrive and as leniently as real upstreams need.

Tolerates CRLF line ends, ``data:`` with or without the space, comment lines
(``: ping``) and a missing blank line at the very end. Events come in batches:
all the events completed by one network read, the moment that read arrives, so
a relay can pass them on with one write instead of one per event.
"""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import StreamReader

Event = tuple[str | None, str]  # (event name or None, data)


class _Parser:
    def __init__(self) -> None:
        self.buf = b""
        self.event: str | None = None
        self.data: list[str] = []

    def feed(self, block: bytes, out: list[Event]) -> None:
        buf = self.buf + block
        start = 0
        while (i := buf.find(b"\n", start)) >= 0:
            self.line(buf[start:i].rstrip(b"\r"), out)
            start = i + 1
        self.buf = buf[start:]

    def line(self, line: bytes, out: list[Event]) -> None:
        if not line:
            if self.data:
                out.append((self.event, "\n".join(self.data)))
            self.event, self.data = None, []
            return
        if line[:1] == b":":
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self.data.append(value.decode("utf-8", errors="replace"))
        elif name == b"event":
            self.event = value.decode("utf-8", errors="replace")

    def finish(self, out: list[Event]) -> None:
        if self.buf:
            self.line(self.buf.rstrip(b"\r"), out)
            self.buf = b""
        self.line(b"", out)


async def sse_batches(content: StreamReader) -> AsyncIterator[list[Event]]:
    parser = _Parser()
    async for block in content.iter_any():
        out: list[Event] = []
        parser.feed(block, out)
        if out:
            yield out
    out = []
    parser.finish(out)
    if out:
        yield out


async def sse_events(content: StreamReader) -> AsyncIterator[Event]:
    async for batch in sse_batches(content):
        for ev in batch:
            yield ev
