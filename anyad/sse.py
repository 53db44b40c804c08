"""Server-sent events, read as they arrive and as leniently as real upstreams need.

Tolerates CRLF line ends, ``data:`` with or without the space, comment lines
(``: ping``) and a missing blank line at the very end. Events come in batches:
all the events completed by one network read, the moment that read arrives, so
a relay can pass them on with one write instead of one per event.
"""

from __future__ import annotations

from typing import AsyncIterator

from aiohttp import StreamReader

Event = tuple[str | None, bytes]  # (event name or None, data as UTF-8 bytes)


class SSEParser:
    def __init__(self) -> None:
        self.buf = b""
        self.event: str | None = None
        self.data: list[bytes] = []

    def feed(self, block: bytes, out: list[Event]) -> None:
        # One split per network read and the per-line work inlined: this loop runs for
        # every event a relay passes on.
        lines = (self.buf + block).split(b"\n")
        self.buf = lines.pop()
        data = self.data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    out.append((self.event, data[0] if len(data) == 1 else b"\n".join(data)))
                    data = []
                self.event = None
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line[:1] == b":":
                continue
            else:
                name, _, value = line.partition(b":")
                if name == b"event":
                    self.event = (value[1:] if value[:1] == b" " else value).decode("utf-8", errors="replace")
        self.data = data

    def finish(self, out: list[Event]) -> None:
        self.feed(b"\n\n" if self.buf else b"\n", out)


async def sse_batches(content: StreamReader) -> AsyncIterator[list[Event]]:
    parser = SSEParser()
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
