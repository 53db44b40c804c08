"""The SSE reader keeps events whole however the network splits them."""

from __future__ import annotations

import random

from anyad.sse import SSEParser

STREAM = (b": ping\r\n\r\n"
          b"data: {\"a\": 1}\r\n\r\n"
          b"data:{\"b\": 2}\n\n"
          b"event: message_delta\ndata: {\"c\":\n"
          b"data: 3}\n\n"
          b"data: [DONE]")  # no blank line at the very end


def parse(blocks: list[bytes]) -> list:
    p, out = SSEParser(), []
    for b in blocks:
        p.feed(b, out)
    p.finish(out)
    return out


EXPECTED = [(None, b'{"a": 1}'), (None, b'{"b": 2}'), ("message_delta", b'{"c":\n3}'), (None, b"[DONE]")]


def test_whole_stream():
    assert parse([STREAM]) == EXPECTED


def test_every_split_point_and_random_fragments():
    for i in range(len(STREAM) + 1):
        assert parse([STREAM[:i], STREAM[i:]]) == EXPECTED
    rng = random.Random(1)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(STREAM)), 6))
        blocks = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
        assert parse(blocks) == EXPECTED
