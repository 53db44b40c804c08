"""Masks e-mail addresses, card numbers and API keys before a request leaves the machine.

Only requests to remote providers are changed (each remote target of a route, fallbacks
included); local models, the history and the client see the original. Each distinct
value becomes a numbered placeholder (``[EMAIL_1]``, ``[CARD_1]``, ``[API_KEY_1]``), the
same value the same placeholder within a request, so the provider can still tell them
apart; nothing is put back into the reply.

``[plugins.redact]``: ``builtin`` (which of ``email``, ``card``, ``api_key`` to use; all by
default) and ``patterns`` (more, as ``NAME = "regular expression"``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, field_validator

import anyad
from anyad.errors import ConfigError

log = logging.getLogger("anyad.redact")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", match.group(0))
    return 13 <= len(digits) <= 19 and _luhn(digits)


# name → (pattern, an extra check on a match or None)
BUILTIN: dict[str, tuple[str, Callable[[re.Match[str]], bool] | None]] = {
    "email": (r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", None),
    # 13-19 digits, spaces or dashes between, passing the Luhn check (so not any long number).
    "card": (r"\b\d(?:[ -]?\d){12,18}\b", _card),
    "api_key": (r"\b(?:sk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}|(?:pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
                r"|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"
                r"|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})", None),
}


class RedactSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    builtin: list[str] = list(BUILTIN)
    patterns: dict[str, str] = {}

    @field_validator("builtin")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [n for n in v if n not in BUILTIN]
        if unknown:
            raise ValueError(f"unknown {unknown}; the built-in ones are {list(BUILTIN)}")
        return v

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ValueError(f"pattern name {name!r}: letters, digits and '_'")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name}: {exc}") from None
        return v


class Redactor:
    def __init__(self, settings: RedactSettings) -> None:
        rules = [(n.upper(), *BUILTIN[n]) for n in settings.builtin]
        rules += [(n.upper(), p, None) for n, p in settings.patterns.items()]
        self.rules = [(label, re.compile(p), check) for label, p, check in rules]

    def text(self, text: str, seen: dict[tuple[str, str], str], counts: dict[str, int]) -> str:
        for label, rx, check in self.rules:
            def sub(m: re.Match[str], label: str = label, check: Any = check) -> str:
                if check is not None and not check(m):
                    return m.group(0)
                key = (label, m.group(0))
                if key not in seen:
                    counts[label] = counts.get(label, 0) + 1
                    seen[key] = f"[{label}_{counts[label]}]"
                return seen[key]

            text = rx.sub(sub, text)
        return text

    def messages(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """New messages with every match masked (the given ones untouched), and how many
        distinct values were masked."""
        seen: dict[tuple[str, str], str] = {}
        counts: dict[str, int] = {}
        out = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = self.text(content, seen, counts)
            elif isinstance(content, list):
                m["content"] = [{**p, "text": self.text(p["text"], seen, counts)}
                                if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in content]
            if m.get("tool_calls"):
                m["tool_calls"] = [self._tool_call(tc, seen, counts) for tc in m["tool_calls"]]
            out.append(m)
        return out, len(seen)

    def _tool_call(self, tc: Any, seen: dict[tuple[str, str], str], counts: dict[str, int]) -> Any:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            return tc
        return {**tc, "function": {**fn, "arguments": self.text(fn["arguments"], seen, counts)}}


REDACTORS: "weakref.WeakKeyDictionary[Any, Redactor]" = weakref.WeakKeyDictionary()


@anyad.hookimpl
def anyad_startup(daemon: Any, config: dict[str, Any]) -> None:
    try:
        settings = RedactSettings.model_validate(config)
    except Exception as exc:
        raise ConfigError(f"plugins.redact: {exc}") from None
    REDACTORS[daemon] = Redactor(settings)


@anyad.hookimpl
def anyad_remote_request(request: Any, target: Any, daemon: Any) -> Any:
    redactor = REDACTORS.get(daemon)
    if redactor is None:  # before start-up finished: nothing may leave unmasked
        redactor = REDACTORS[daemon] = Redactor(RedactSettings.model_validate(daemon.plugins.options("redact")))
    messages, n = redactor.messages(request.messages)
    if not n:
        return None
    log.info("masked %d value(s) before sending to %s", n, target.name)
    return dataclasses.replace(request, messages=messages)
