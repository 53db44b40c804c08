"""Internal chunks → OpenAI chat-completions JSON and SSE, at the edge.

Stream chunks are built from byte templates fixed per reply, with only the
JSON-encoded text spliced in: the per-token cost stays a few microseconds.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from anyad.stream import Usage

DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class OpenAIEncoder:
    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                "system_fingerprint": None}
        head_json = _dumps(head)[:-1]
        self._usage_tail = ',"usage":null' if include_usage else ""
        self._delta_head = (f'data: {head_json},"choices":[{{"index":0,"delta":{{"content":').encode()
        self._delta_tail = (f'}},"logprobs":null,"finish_reason":null}}]{self._usage_tail}}}\n\n').encode()
        self._head = head

    def _event(self, choices: list[dict[str, Any]], usage: Usage | None = None, with_usage: bool = False) -> bytes:
        obj = {**self._head, "choices": choices}
        if self.include_usage or with_usage:
            obj["usage"] = usage.as_dict() if usage else None
        return b"data: " + _dumps(obj).encode() + b"\n\n"

    def role(self) -> bytes:
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta(self, text: str) -> bytes:
        return self._delta_head + _dumps(text).encode() + self._delta_tail

    def finish(self, reason: str) -> bytes:
        return self._event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: Usage) -> bytes:
        """OpenAI's extra last chunk for ``stream_options.include_usage``: no choices, the usage."""
        return self._event([], usage, with_usage=True)

    def completion(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage.as_dict(),
        }


def sse_error(body: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(body).encode() + b"\n\n"
