"""Tool calls and reasoning in a local model's own words.

Each model family writes tool calls in its own syntax (Hermes ``<tool_call>``,
Llama 3.1+ JSON after ``<|python_tag|>``, Mistral ``[TOOL_CALLS]``) and thinks
inside ``<think>…</think>``. ``family_of`` recognises the syntax from the chat
template, ``ReplyParser`` turns streamed text into OpenAI content, reasoning and
tool-call deltas, and ``forced_call_grammar`` makes the model write a valid call
when the client requires one.

The worker process imports this module for every reply, so it stays stdlib-only
at import time and costs a few microseconds per token.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Callable

from anyad.errors import InvalidRequest

FAMILIES = ("hermes", "llama3", "mistral", "generic", "none")

THINK = ("<think>", "</think>")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"

# Markers that open a call in running text; what follows either ends at a closing
# tag (Hermes) or runs to the end of the reply (the others).
_OPENERS: dict[str, tuple[str, ...]] = {
    "hermes": (HERMES_OPEN,),
    "llama3": (PYTHON_TAG,),
    "mistral": (MISTRAL_CALLS,),
    "generic": (),
    "none": (),
}
# The key that holds the arguments in each family's own call object.
_ARGS_KEY = {"llama3": "parameters"}

_ID_CHARS = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Family:
    name: str                            # "hermes" | "llama3" | "mistral" | "generic" | "none"
    reasoning: tuple[str, str] | None    # ("<think>", "</think>") when the template has a thinking block
    thinking_switch: str | None          # the template variable that turns thinking on/off, if any


_TOOLS_RE = re.compile(r"\btools\b|\btool_calls\b")


def family_of(template: str | None, override: str | None = None) -> Family:
    """Recognise the tool-call syntax and reasoning tags from a chat template's text.

    ``override`` is the config's per-model setting; it fixes the tool-call syntax while
    the reasoning tags are still read from the template.
    """
    t = template or ""
    if override is not None and override not in FAMILIES:
        raise ValueError(f"unknown tool-call family {override!r}; expected one of {', '.join(FAMILIES)}")
    reasoning = THINK if THINK[0] in t and THINK[1] in t else None
    switch = "enable_thinking" if "enable_thinking" in t else None
    if override is not None:
        name = override
    elif HERMES_OPEN in t:
        name = "hermes"
    elif MISTRAL_CALLS in t or "[AVAILABLE_TOOLS]" in t:
        name = "mistral"
    elif PYTHON_TAG in t or "ipython" in t:
        name = "llama3"
    elif _TOOLS_RE.search(t):
        name = "generic"
    else:
        name = "none"
    return Family(name, reasoning, switch)


def opens_reasoning(family: Family, prompt: str) -> bool:
    """Did the rendered prompt already open the thinking block (DeepSeek-R1's ``<think>\\n``)?"""
    return family.reasoning is not None and prompt.rstrip().endswith(family.reasoning[0])


@dataclass
class Event:
    text: str = ""                           # content delta
    reasoning: str = ""                      # reasoning_content delta
    tool_calls: list[dict] | None = None     # OpenAI tool-call deltas


class _Malformed(Exception):
    """A call the model meant to write but got wrong; its message is the reason."""


class _NotACall(Exception):
    """JSON that is an ordinary answer, not a call."""


_CALL_KEYS = {"name", "arguments", "parameters", "type", "id"}


def _calls_in(value: Any, strict: bool) -> list[tuple[str, str]]:
    """(name, arguments as a JSON object string) for each call in a decoded value.

    ``strict`` is for a bare JSON reply, which may well be an ordinary answer: only
    objects with nothing but call keys count as calls.
    """
    if isinstance(value, list):
        if not value:
            raise _NotACall if strict else _Malformed("empty list of tool calls")
        return [c for v in value for c in _calls_in(v, strict)]
    if not isinstance(value, dict):
        if strict:
            raise _NotACall
        raise _Malformed("tool call is not a JSON object")
    if isinstance(value.get("tool_calls"), list) and (len(value) == 1 or not strict):
        return _calls_in(value["tool_calls"], strict=False)
    if isinstance(value.get("function"), dict):  # OpenAI's own shape
        value = value["function"]
    elif strict and ("name" not in value or not set(value) <= _CALL_KEYS
                     or not {"arguments", "parameters"} & set(value)):
        raise _NotACall
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise _Malformed("tool call has no name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise _Malformed(f"arguments of {name!r} are not valid JSON") from None
    if not isinstance(args, dict):
        raise _Malformed(f"arguments of {name!r} are not a JSON object")
    return [(name, json.dumps(args, ensure_ascii=False))]


_DECODER = json.JSONDecoder()


def _json_values(text: str, sep: str = ";") -> list[Any]:
    """Every JSON value in ``text``, separated by whitespace or ``sep`` (Llama's ``;``)."""
    values: list[Any] = []
    i, n = 0, len(text)
    while True:
        while i < n and (text[i].isspace() or text[i] in sep):
            i += 1
        if i == n:
            return values
        value, i = _DECODER.raw_decode(text, i)
        values.append(value)


# The head of a forced Hermes call, as forced_call_grammar writes it.
_LIVE_HEAD = re.compile(r'\s*\{"name": ("(?:[^"\\]|\\.)*"), "(?:arguments|parameters)": ')


def _held(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``buf`` that may be the start of a marker."""
    best = 0
    for m in markers:
        tail = buf[-(len(m) - 1):] if len(m) > 1 else ""
        i = tail.find(m[0])
        while i >= 0:
            if m.startswith(tail[i:]):
                best = max(best, len(tail) - i)
                break
            i = tail.find(m[0], i + 1)
    return best


_TEXT, _REASONING, _CALL, _TAIL, _BARE = range(5)
_LOOKS_LIKE_CALL = re.compile(r'^\s*[\[{]\s*(\{\s*)?"(name|tool_calls|function)"')


class ReplyParser:
    """Streamed model text in; content, reasoning and tool-call events out.

    Only what might be the start of a marker is held back (a trailing ``<tool``),
    and whitespace that may turn out to sit between calls; everything else is
    passed on as it arrives. A reply whose first character is ``{`` or ``[`` while
    tools are offered is held to the end, since only then can a bare JSON call be
    told from a JSON answer.
    """

    def __init__(self, family: Family, *, tools: bool, reasoning: bool, parallel: bool = True,
                 reasoning_inline: bool = False, started_in_reasoning: bool = False,
                 forced: bool = False) -> None:
        self.family = family
        # A grammar forces the call (tool_choice "required" or a named function): it cannot
        # come out malformed, so its arguments are streamed as they are written instead of
        # held until the call closes.
        self._live_calls = forced and family.name == "hermes"
        self._live: list[int] | None = None  # [call index, arguments emitted up to] of a streamed call
        self.calls = 0
        self._tools = tools
        self._parallel = parallel
        self._inline = reasoning_inline
        self._think = family.reasoning if (reasoning or reasoning_inline) else None
        self._openers = _OPENERS.get(family.name, ()) if tools else ()
        self._out: list[Event] = []
        self._pending = ""       # text not yet looked at for markers
        self._body = ""          # the call being read
        self._opener = ""        # the marker that opened it
        self._scanned = 0        # how much of _body was searched for the closing tag
        self._ws = ""            # trailing content whitespace, held: it is dropped after calls
        self._rws = ""           # trailing reasoning whitespace, held: dropped at the closing tag
        self._fresh = True       # no content and no call yet
        self._thought = False    # a reasoning block has closed
        self._trim = False       # drop the leading whitespace of the next content
        self._reasoned = False   # some reasoning has been emitted
        self._dropped = 0
        self._notes: list[str] = []
        self._mode = _TEXT
        if started_in_reasoning and self._think:
            self._mode = _REASONING
            if reasoning_inline:  # the prompt opened the block; show the client a whole one
                self._raw_text(self._think[0])

    # -- output ---------------------------------------------------------------

    def _raw_text(self, s: str) -> None:
        if not s:
            return
        last = self._out[-1] if self._out else None
        if last is not None and not last.reasoning and last.tool_calls is None:
            last.text += s
        else:
            self._out.append(Event(text=s))

    def _text(self, s: str) -> None:
        core = s.rstrip()
        if not core:
            self._ws += s
            return
        lead, self._ws = self._ws, s[len(core):]
        if self._trim:  # the blank line after </think> or a call is layout, not content
            lead, core, self._trim = "", core.lstrip(), False
        self._raw_text(lead + core)
        self._fresh = False

    def _reason(self, s: str) -> None:
        if self._inline:
            self._raw_text(s)
            return
        if not self._reasoned:
            s = s.lstrip()
        core = s.rstrip()
        if not core:
            if self._reasoned:
                self._rws += s
            return
        s, self._rws = self._rws + core, s[len(core):]
        self._reasoned = True
        last = self._out[-1] if self._out else None
        if last is not None and last.reasoning and not last.text and last.tool_calls is None:
            last.reasoning += s
        else:
            self._out.append(Event(reasoning=s))

    def _call(self, name: str, arguments: str) -> None:
        if self.calls and not self._parallel:
            self._dropped += 1
            return
        index = self._open_call(name)
        header = self._out[-1].tool_calls
        assert header is not None  # _open_call's event: the arguments go out with their header
        header.append({"index": index, "function": {"arguments": arguments}})

    def _open_call(self, name: str) -> int:
        """The next call's header (index, a fresh id, its name) out; its index."""
        index = self.calls
        self.calls += 1
        self._ws, self._fresh, self._trim = "", False, True
        cid = "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))
        self._out.append(Event(tool_calls=[
            {"index": index, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}]))
        return index

    def _calls_or_text(self, raw: str, body: str, parse: Callable[[str], list[tuple[str, str]]],
                       why: str | None = None, quiet: bool = False) -> None:
        """Emit the calls ``parse(body)`` finds, or else ``raw`` as text with the reason.

        ``quiet``: a bare JSON reply that does not look like a call is an answer, no note.
        """
        try:
            found = parse(body)
            if not found:
                raise _Malformed(f"no tool call after {self._opener}")
        except _NotACall:
            self._text(raw)
            return
        except _Malformed as e:
            reason = str(e)
        except ValueError as e:
            if quiet and not _LOOKS_LIKE_CALL.match(body):
                self._text(raw)
                return
            reason = why or f"tool call is not valid JSON ({e})"
        else:
            for name, arguments in found:
                self._call(name, arguments)
            return
        self._notes.append(reason)
        self._text(raw)

    # -- input ----------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        """Streamed text in, events out."""
        if text:
            self._pending += text
            while self._step():
                pass
        out, self._out = self._out, []
        return out

    def close(self) -> tuple[list[Event], str | None]:
        """The rest of the events, and None or why a call was returned as text (or dropped)."""
        while self._step():
            pass
        buf, self._pending = self._pending, ""
        if self._mode == _TEXT:
            self._text(buf)
        elif self._mode == _REASONING:
            self._reason(buf)
        elif self._mode == _CALL:
            body = self._body + buf
            self._calls_or_text(self._opener + body, body, self._parse_tagged,
                                why=f"{self._opener} was never closed")
        elif self._mode == _TAIL:
            body = self._body + buf
            parse = self._parse_mistral if self._opener == MISTRAL_CALLS else self._parse_bare_tail
            self._calls_or_text(self._opener + body, body, parse)
        elif self._mode == _BARE:
            self._calls_or_text(self._body + buf, self._body + buf, self._parse_bare, quiet=True)
        if self.calls == 0:
            self._raw_text(self._ws)
        self._ws = ""
        if self._dropped:
            self._notes.append(f"parallel_tool_calls is false: {self._dropped} more tool call(s) dropped")
        out, self._out = self._out, []
        return out, "; ".join(self._notes) or None

    # -- parsing --------------------------------------------------------------

    @staticmethod
    def _parse_tagged(body: str) -> list[tuple[str, str]]:
        return [c for v in _json_values(body, sep="") for c in _calls_in(v, strict=False)]

    @staticmethod
    def _parse_bare_tail(body: str) -> list[tuple[str, str]]:
        return [c for v in _json_values(body) for c in _calls_in(v, strict=False)]

    @staticmethod
    def _parse_bare(body: str) -> list[tuple[str, str]]:
        return [c for v in _json_values(body) for c in _calls_in(v, strict=True)]

    @staticmethod
    def _parse_mistral(body: str) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for part in body.split(MISTRAL_CALLS):
            part = part.strip()
            if not part:
                continue
            if part[0] in "[{":
                found += [c for v in _json_values(part, sep="") for c in _calls_in(v, strict=False)]
                continue
            # The newer form: name[ARGS]{…}, or name[CALL_ID]id[ARGS]{…}.
            name, sep, args = part.partition(MISTRAL_ARGS)
            if not sep:
                raise _Malformed("[TOOL_CALLS] is followed by neither JSON nor name[ARGS]")
            name = name.partition(MISTRAL_CALL_ID)[0].strip()
            values = _json_values(args, sep="")
            if len(values) != 1:
                raise _Malformed(f"arguments of {name!r} are not one JSON object")
            found += _calls_in({"name": name, "arguments": values[0]}, strict=False)
        return found

    def _step(self) -> bool:
        """Consume what it can of the pending text; True when there is more to do."""
        if self._mode == _TEXT:
            return self._step_text()
        if self._mode == _REASONING:
            return self._step_reasoning()
        buf, self._pending = self._pending, ""
        self._body += buf
        if self._mode != _CALL:
            return False
        close = HERMES_CLOSE
        i = self._body.find(close, max(0, self._scanned - len(close) + 1))
        if i < 0:
            self._scanned = len(self._body)
            if self._live_calls:
                self._stream_call(self._body[:len(self._body) - _held(self._body, (close,))], final=False)
            return False
        body, self._pending = self._body[:i], self._body[i + len(close):]
        self._body, self._scanned, self._mode = "", 0, _TEXT
        if not (self._live_calls and self._stream_call(body, final=True)):
            self._calls_or_text(self._opener + body + close, body, self._parse_tagged)
        return bool(self._pending)

    def _stream_call(self, body: str, final: bool) -> bool:
        """Stream a forced call's ``{"name": N, "arguments": …}`` as it is written: the header
        once the name is whole, then the arguments, holding back what may be the object's
        closing brace; ``final``: the body is whole. False while no header could be sent."""
        if self._live is None:
            m = _LIVE_HEAD.match(body)
            if m is None or (self.calls and not self._parallel):
                return False
            self._live = [self._open_call(json.loads(m.group(1))), m.end()]
        index, done = self._live
        core = body.rstrip()
        end = len(core) - 1 if core.endswith("}") else len(core)  # the call object's own "}"
        if end > done:
            self._out.append(Event(tool_calls=[{"index": index, "function": {"arguments": body[done:end]}}]))
            self._live[1] = end
        if final:
            self._live = None
        return True

    def _step_text(self) -> bool:
        buf = self._pending
        think = self._think if not self._thought else None  # the markers, while thinking may still open
        if self._fresh and (self._tools or think is not None):
            # At the start of the reply: thinking, a call marker or a bare JSON call.
            head = buf.lstrip()
            if not head:
                return False
            if think is not None and head.startswith(think[0]):
                self._pending, self._mode = head[len(think[0]):], _REASONING
                if self._inline:
                    self._raw_text(think[0])
                return True
            starts = self._openers + ((think[0],) if think is not None else ())
            if any(len(head) < len(m) and m.startswith(head) for m in starts):
                return False
            if self._tools and head[0] in "{[" and not any(head.startswith(m) for m in self._openers):
                self._body, self._pending, self._mode = head, "", _BARE
                return False
        best, marker = -1, ""
        for m in self._openers:
            i = buf.find(m)
            if i >= 0 and (best < 0 or i < best):
                best, marker = i, m
        if best < 0:
            keep = _held(buf, self._openers) if self._openers else 0
            self._text(buf[:len(buf) - keep])
            self._pending = buf[len(buf) - keep:]
            return False
        self._text(buf[:best])
        self._opener, self._pending = marker, buf[best + len(marker):]
        self._mode = _CALL if marker == HERMES_OPEN else _TAIL
        return True

    def _step_reasoning(self) -> bool:
        assert self._think is not None  # the reasoning mode is entered only with thinking markers
        close = self._think[1]
        buf = self._pending
        i = buf.find(close)
        if i < 0:
            keep = _held(buf, (close,))
            self._reason(buf[:len(buf) - keep])
            self._pending = buf[len(buf) - keep:]
            return False
        self._reason(buf[:i])
        if self._inline:
            self._raw_text(close)
        self._pending, self._rws = buf[i + len(close):], ""
        self._mode, self._thought = _TEXT, True
        self._trim = self._fresh and not self._inline
        return True


# -- forcing a call ------------------------------------------------------------------


def _lit(s: str) -> str:
    """A GBNF string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r").replace("\t", "\\t") + '"'


def forced_call_grammar(family: Family, tools: list[dict], choice: str | dict, parallel: bool,
                        *, close_reasoning: bool = False) -> str:
    """GBNF that forces the model to write one (or, with ``parallel``, one or more) valid
    call(s) in the family's own syntax, arguments matching the tool's JSON schema.

    ``choice`` is ``"required"`` (any of the tools) or ``{"type": "function", "function":
    {"name": N}}``. ``close_reasoning``: the prompt opened a thinking block, so the
    grammar closes it first (an empty thought) rather than calling from inside it.
    """
    # The converter is llama-cpp-python's; the worker has it, the daemon need not.
    from llama_cpp.llama_grammar import SchemaConverter

    functions = [t["function"] for t in tools if isinstance(t.get("function"), dict)]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f.get("name") == wanted]
        if not functions:
            raise InvalidRequest(f"tool_choice names {wanted!r}, which is not among the tools",
                                 param="tool_choice")
    if not functions:
        raise InvalidRequest("tool_choice requires a call but no tools were given", param="tool_choice")

    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    args_key = _ARGS_KEY.get(family.name, "arguments")
    alternatives = []
    for i, f in enumerate(functions):
        schema = f.get("parameters") or {"type": "object"}
        args_rule = conv.visit(conv.resolve_refs(schema, f"tool{i}"), f"tool{i}-args")
        head = '{"name": ' + json.dumps(f["name"], ensure_ascii=False) + f', "{args_key}": '
        alternatives.append(f"{_lit(head)} {args_rule} {_lit('}')}")

    # Each family's call, and how several are joined, as the family writes them.
    sep, pre, post = {
        "hermes": ("\n", "", ""),
        "llama3": ("; ", "", ""),
        "mistral": (", ", MISTRAL_CALLS + "[", "]"),
    }.get(family.name, (", ", '{"tool_calls": [', "]}") if parallel else ("", "", ""))
    one = _lit(HERMES_OPEN + "\n") + " tc-call " + _lit("\n" + HERMES_CLOSE) \
        if family.name == "hermes" else "tc-call"
    root = f"tc-one ({_lit(sep)} tc-one)*" if parallel else "tc-one"
    if pre:
        root = f"{_lit(pre)} {root} {_lit(post)}"
    if close_reasoning and family.reasoning:
        root = _lit("\n" + family.reasoning[1] + "\n\n") + " " + root
    rules = [f"root ::= {root}", f"tc-one ::= {one}", "tc-call ::= " + " | ".join(alternatives),
             conv.format_grammar()]
    return "\n".join(rules) + "\n"
