"""Ollama's TEMPLATE: the Go text/template a Modelfile gives a model, rendered as Ollama
renders it.

A model created with ``TEMPLATE`` (``/api/create``) has its prompts rendered here, by the
door, and sent to the model as they are (as a completions prompt: no chat template of
the model's own on top). The template sees what Ollama's sees: ``.Messages`` (each with
``.Role`` and ``.Content``), ``.System``, ``.Prompt``, ``.Response``, ``.Tools``,
``.Think``; a template without ``.Messages`` is rendered turn by turn (``.System``,
``.Prompt``, ``.Response``) and cut at the last turn's ``.Response``, as Ollama does.

The language is the part of Go's text/template that model templates use: text and
``{{ }}`` actions with ``{{-``/``-}}`` trimming and comments; fields (``.A.B``), variables
(``$``, ``$x := …``, ``$x = …``), literals, parentheses and pipes; ``if``/``else if``/
``else``, ``range`` (``$i, $v :=``, ``else``, ``break``, ``continue``), ``with``; and the
functions ``and or not eq ne lt le gt ge len index slice print printf println json
currentDate``. A template using anything else is refused when the model is created, and so
is one nested deeper than ``MAX_DEPTH``.

Rendering is bounded: at most ``MAX_STEPS`` steps (actions, commands and loop turns) for
one prompt, and at most ``max_chars`` characters of output (and of any one value a
function makes); a template that would go past either is a TemplateError, not a prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import date
from functools import lru_cache
from typing import Any

from anyad.errors import InvalidRequest
from anyad.stream import ChatRequest


class TemplateError(ValueError):
    pass


MAX_DEPTH = 64  # nested blocks, or parentheses in one action
MAX_STEPS = 200_000  # what rendering one prompt may take (Ollama's own templates need some thousands)
MAX_CHARS = 4_000_000  # the output's bound when the caller gives none


class _Cut(Exception):
    """Rendering stops at ``.Response`` (the last turn of a template without ``.Messages``)."""


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# -- lexing -------------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<char>'(?:[^'\\]|\\.)')
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[()|,])
""", re.X | re.S)


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(src):
        m = TOKEN.match(src, i)
        if m is None:
            raise TemplateError(f"unexpected {src[i:i + 20]!r} in an action")
        i = m.end()
        kind = m.lastgroup or ""
        if kind == "ws":
            continue
        text = m.group()
        # A field right after a value or a parenthesis is a chain on it: `$x.Name`, `(f).Name`.
        if kind == "field" and text != "." and out and out[-1][0] in ("var", "close") and src[m.start() - 1] != " ":
            out.append(("chain", text))
            continue
        if kind == "punct":
            kind = {"(": "open", ")": "close", "|": "pipe", ",": "comma"}[text]
        out.append((kind, text))
    return out


# -- the tree -----------------------------------------------------------------------------------

@dataclass
class Cmd:
    args: list[Any]  # operands: ("field", [names]) ("var", name, [names]) ("lit", v) ("pipe", Pipe, [names]) ("fn", n)


@dataclass
class Pipe:
    decl: list[str]
    op: str | None  # ":=" or "=" with decl
    cmds: list[Cmd]


@dataclass
class Text:
    text: str


@dataclass
class Out:
    pipe: Pipe


@dataclass
class If:
    pipe: Pipe
    then: list[Any]
    other: list[Any]
    kind: str = "if"  # or "with"


@dataclass
class Range:
    pipe: Pipe
    body: list[Any]
    other: list[Any]


@dataclass
class Loop:
    what: str  # break | continue


FUNCS = {"and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index", "slice", "print", "printf",
         "println", "json", "currentDate"}


class _Parser:
    def __init__(self, src: str) -> None:
        self.items = self._split(src)
        self.i = 0
        self.depth = 0

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TemplateError(f"the template nests deeper than {MAX_DEPTH} levels")

    @staticmethod
    def _split(src: str) -> list[tuple[str, str]]:
        """Text and actions, trimmed as ``{{-`` and ``-}}`` ask."""
        parts: list[tuple[str, str]] = []
        pos, trim_next = 0, False
        for m in ACTION.finditer(src):
            text = src[pos:m.start()]
            if trim_next:
                text = text.lstrip()
            if m.group(1):
                text = text.rstrip()
            if text:
                parts.append(("text", text))
            body = m.group(2).strip()
            if not (body.startswith("/*") and body.endswith("*/")):
                parts.append(("action", body))
            trim_next = bool(m.group(3))
            pos = m.end()
        text = src[pos:]
        if "{{" in text:
            raise TemplateError("an action is not closed with }}")
        if trim_next:
            text = text.lstrip()
        if text:
            parts.append(("text", text))
        return parts

    def parse(self) -> list[Any]:
        nodes, end = self._list()
        if end is not None:
            raise TemplateError(f"unexpected {{{{ {end} }}}}")
        return nodes

    def _list(self) -> tuple[list[Any], str | None]:
        """Nodes up to an ``end``/``else`` (returned: the action's text) or the end."""
        self._deeper()
        try:
            return self._nodes()
        finally:
            self.depth -= 1

    def _nodes(self) -> tuple[list[Any], str | None]:
        nodes: list[Any] = []
        while self.i < len(self.items):
            kind, body = self.items[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(Text(body))
                continue
            word = body.split(None, 1)[0] if body else ""
            rest = body[len(word):].strip()
            if word in ("end", "else"):
                return nodes, body
            if word in ("if", "with"):
                nodes.append(self._if(rest, word))
            elif word == "range":
                pipe = self._pipe(_tokens(rest))
                body_nodes, end = self._list()
                other: list[Any] = []
                if end == "else":
                    other, end = self._list()
                if end != "end":
                    raise TemplateError("a range has no {{ end }}")
                nodes.append(Range(pipe, body_nodes, other))
            elif word in ("break", "continue") and not rest:
                nodes.append(Loop(word))
            elif word in ("define", "template", "block"):
                raise TemplateError(f"{{{{ {word} }}}} is not supported")
            else:
                nodes.append(Out(self._pipe(_tokens(body))))
        return nodes, None

    def _if(self, rest: str, kind: str) -> If:
        pipe = self._pipe(_tokens(rest))
        then, end = self._list()
        other: list[Any] = []
        if end is not None and end.startswith("else"):
            tail = end[4:].strip()
            if tail.startswith(("if ", "with ")):
                word, _, cond = tail.partition(" ")
                other = [self._if(cond, word)]
                return If(pipe, then, other, kind)
            other, end = self._list()
        if end != "end":
            raise TemplateError(f"an {kind} has no {{{{ end }}}}")
        return If(pipe, then, other, kind)

    def _pipe(self, toks: list[tuple[str, str]]) -> Pipe:
        self._deeper()
        try:
            return self._pipe_of(toks)
        finally:
            self.depth -= 1

    def _pipe_of(self, toks: list[tuple[str, str]]) -> Pipe:
        decl: list[str] = []
        op = None
        # `$a, $b :=` / `$a :=` / `$a =`
        j = 0
        names = []
        while j < len(toks) and toks[j][0] == "var":
            names.append(toks[j][1])
            if j + 1 < len(toks) and toks[j + 1][0] == "comma":
                j += 2
                continue
            break
        if names and j + 1 < len(toks) and toks[j + 1][0] in ("decl", "assign"):
            decl, op, toks = names, toks[j + 1][1], toks[j + 2:]
        cmds: list[Cmd] = []
        cur: list[Any] = []  # the command's operands (see Cmd)
        depth = 0
        sub: list[tuple[str, str]] = []
        k = 0
        while k < len(toks):
            kind, text = toks[k]
            if kind == "pipe":
                cmds.append(self._cmd(cur))
                cur = []
            elif kind == "open":
                depth, sub, k2 = 1, [], k + 1
                while k2 < len(toks) and depth:
                    if toks[k2][0] == "open":
                        depth += 1
                    elif toks[k2][0] == "close":
                        depth -= 1
                    if depth:
                        sub.append(toks[k2])
                    k2 += 1
                if depth:
                    raise TemplateError("a ( is not closed")
                chain: list[str] = []
                while k2 < len(toks) and toks[k2][0] == "chain":
                    chain += toks[k2][1].split(".")[1:]
                    k2 += 1
                cur.append(("pipe", self._pipe(sub), chain))
                k = k2
                continue
            else:
                cur.append(self._operand(kind, text, toks, k))
                if kind == "var" and k + 1 < len(toks) and toks[k + 1][0] == "chain":
                    cur[-1] = ("var", text, toks[k + 1][1].split(".")[1:])
                    k += 1
            k += 1
        if cur or not cmds:
            cmds.append(self._cmd(cur))
        return Pipe(decl, op, cmds)

    @staticmethod
    def _operand(kind: str, text: str, toks: list[tuple[str, str]], k: int) -> Any:
        if kind == "field":
            return ("field", [] if text == "." else text.split(".")[1:])
        if kind == "var":
            return ("var", text, [])
        if kind == "str":
            return ("lit", json.loads(text))
        if kind == "raw":
            return ("lit", text[1:-1])
        if kind == "char":
            return ("lit", ord(json.loads('"' + text[1:-1].replace('"', '\\"') + '"')))
        if kind == "num":
            return ("lit", float(text) if "." in text else int(text))
        if kind == "ident":
            if text in ("true", "false"):
                return ("lit", text == "true")
            if text == "nil":
                return ("lit", None)
            if text not in FUNCS:
                raise TemplateError(f"the function {text!r} is not supported")
            return ("fn", text)
        raise TemplateError(f"unexpected {text!r}")

    @staticmethod
    def _cmd(args: list[Any]) -> Cmd:
        if not args:
            raise TemplateError("an empty command")
        if any(a[0] == "fn" for a in args[1:]):
            raise TemplateError("a function name where a value belongs")
        return Cmd(args)


@lru_cache(maxsize=64)
def compile_template(src: str) -> list[Any]:
    """A template's tree; raises TemplateError for what this renderer does not take."""
    if not isinstance(src, str):
        raise TemplateError("the template must be a string")
    try:
        return _Parser(src).parse()
    except RecursionError:  # (MAX_DEPTH keeps well below Python's limit: this is a backstop)
        raise TemplateError("the template nests too deeply") from None


# -- rendering ----------------------------------------------------------------------------------

def truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, bool) and isinstance(v, (int, float))
                or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0))


def _text(v: Any) -> str:
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_text(x)}" for k, x in v.items()) + "]"
    return str(v)


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        if m.group() == "%%":
            return "%"
        v: Any = next(it, None)
        if m.group(1) == "q":
            return json.dumps(_text(v))
        if m.group(1) == "d":
            return str(int(v))
        return _text(v)

    return re.sub(r"%%|%[-+# 0-9.]*([sdvqtf])", one, fmt)


def _cmp(a: Any, b: Any) -> tuple[Any, Any]:
    return (a, b) if type(a) is type(b) or all(isinstance(x, (int, float)) for x in (a, b)) else (str(a), str(b))


def _call(name: str, args: list[Any]) -> Any:
    if name == "not":
        return not truthy(args[0])
    if name == "and":
        for a in args:
            if not truthy(a):
                return a
        return args[-1]
    if name == "or":
        for a in args:
            if truthy(a):
                return a
        return args[-1]
    if name == "eq":
        return any(_cmp(args[0], b)[0] == _cmp(args[0], b)[1] for b in args[1:])
    if name in ("ne", "lt", "le", "gt", "ge"):
        a, b = _cmp(args[0], args[1])
        return {"ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]
    if name == "len":
        return len(args[0] or ())
    if name == "index":
        v = args[0]
        for k in args[1:]:
            v = v.get(k) if isinstance(v, dict) else v[int(k)]
        return v
    if name == "slice":
        v = args[0] or []
        lo = int(args[1]) if len(args) > 1 else 0
        hi = int(args[2]) if len(args) > 2 else len(v)
        return v[lo:hi]
    if name == "print":
        return "".join(_text(a) for a in args)
    if name == "println":
        return " ".join(_text(a) for a in args) + "\n"
    if name == "printf":
        return _printf(str(args[0]), *args[1:])
    if name == "json":
        return json.dumps(args[0], ensure_ascii=False, separators=(",", ":"))
    if name == "currentDate":
        return date.today().isoformat()
    raise TemplateError(f"the function {name!r} is not supported")  # pragma: no cover


class Budget:
    """What rendering one prompt may take: steps, characters of output, and characters the
    functions make on the way (``print``, ``printf``, ``slice``... in a loop, a variable that
    doubles each turn would otherwise outgrow any memory)."""

    def __init__(self, max_chars: int = MAX_CHARS, max_steps: int = MAX_STEPS) -> None:
        self.steps = max_steps
        self.chars = max_chars
        self.made = 4 * max_chars
        self.max_chars = max_chars
        self.max_steps = max_steps

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateError(f"rendering takes more than {self.max_steps} steps (a loop within loops over the "
                                "conversation?)")

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            self.made -= len(v)
            if len(v) > self.max_chars or self.made < 0:
                raise TemplateError(f"rendering makes more text than a prompt of {self.max_chars} characters could "
                                    "need")
        return v

    def write(self, text: str) -> None:
        self.chars -= len(text)
        if self.chars < 0:
            raise TemplateError(f"the prompt would be longer than {self.max_chars} characters")


class _Render:
    def __init__(self, root: Any, cut: bool, budget: Budget) -> None:
        self.root = root
        self.cut = cut
        self.budget = budget
        self.out: list[str] = []
        self.scopes: list[dict[str, Any]] = [{"$": root}]

    def emit(self, text: str) -> None:
        self.budget.write(text)
        self.out.append(text)

    def _field(self, v: Any, names: list[str]) -> Any:
        for n in names:
            if self.cut and n == "Response":
                raise _Cut
            if isinstance(v, dict):
                v = v.get(n)
            elif v is None:
                return None
            else:
                v = getattr(v, n, None)
        return v

    def _var(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable {name}")

    def _operand(self, a: Any, dot: Any) -> Any:
        kind = a[0]
        if kind == "field":
            return self._field(dot, a[1])
        if kind == "var":
            return self._field(self._var(a[1]), a[2])
        if kind == "lit":
            return a[1]
        if kind == "pipe":
            return self._field(self.pipe(a[1], dot), a[2])
        raise TemplateError("a function name where a value belongs")

    def pipe(self, p: Pipe, dot: Any) -> Any:
        value: Any = None
        for i, cmd in enumerate(p.cmds):
            self.budget.step()
            first = cmd.args[0]
            if first[0] == "fn":
                args = [self._operand(a, dot) for a in cmd.args[1:]]
                if i:
                    args.append(value)
                if first[1] in ("and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "len", "index",
                                "slice", "json", "printf") and not args:
                    raise TemplateError(f"{first[1]} needs arguments")
                value = self.budget.value(_call(first[1], args))
            else:
                if len(cmd.args) > 1 or i:
                    raise TemplateError("only a function takes arguments")
                value = self._operand(first, dot)
        if p.decl:
            if p.op == ":=":
                self.scopes[-1][p.decl[-1]] = value
            else:
                for scope in reversed(self.scopes):
                    if p.decl[-1] in scope:
                        scope[p.decl[-1]] = value
                        break
                else:
                    raise TemplateError(f"undefined variable {p.decl[-1]}")
        return value

    def run(self, nodes: list[Any], dot: Any) -> None:
        for n in nodes:
            self.budget.step()
            if isinstance(n, Text):
                self.emit(n.text)
            elif isinstance(n, Out):
                v = self.pipe(n.pipe, dot)
                if not n.pipe.decl:
                    self.emit(_text(v))
            elif isinstance(n, If):
                self.scopes.append({})
                try:
                    v = self.pipe(n.pipe, dot)
                    if truthy(v):
                        self.run(n.then, v if n.kind == "with" else dot)
                    else:
                        self.run(n.other, dot)
                finally:
                    self.scopes.pop()
            elif isinstance(n, Range):
                self._range(n, dot)
            elif isinstance(n, Loop):
                raise _Break if n.what == "break" else _Continue

    def _range(self, n: Range, dot: Any) -> None:
        p = n.pipe
        self.scopes.append({})
        try:
            seq = self.pipe(Pipe([], None, p.cmds), dot)
            items: Any
            if isinstance(seq, int) and not isinstance(seq, bool):  # Go 1.22: 0, 1, ... seq - 1
                if len(p.decl) > 1:
                    raise TemplateError("a range over an integer takes one variable")
                items = ((i, i) for i in range(seq))  # lazily: the step budget bounds it, not its size
                empty = seq <= 0
            elif isinstance(seq, dict):
                items = sorted(seq.items(), key=lambda kv: str(kv[0]))  # Go ranges over a map's keys in order
                empty = not items
            elif seq is None or isinstance(seq, (list, tuple, str)):
                items = list(enumerate(seq or []))
                empty = not items
            else:
                raise TemplateError(f"range cannot iterate over {type(seq).__name__}")
            if empty:
                self.run(n.other, dot)
                return
            for k, v in items:
                self.budget.step()
                self.scopes.append({})
                if len(p.decl) == 1:
                    self.scopes[-1][p.decl[0]] = v
                elif len(p.decl) == 2:
                    self.scopes[-1][p.decl[0]] = k
                    self.scopes[-1][p.decl[1]] = v
                try:
                    self.run(n.body, v)
                except _Continue:
                    pass
                except _Break:
                    break
                finally:
                    self.scopes.pop()
        finally:
            self.scopes.pop()


def _uses(nodes: list[Any], field: str) -> bool:
    """Whether the template reads ``field`` anywhere (Ollama: a template with .Messages
    gets the whole conversation at once)."""
    def pipe_uses(p: Pipe) -> bool:
        for cmd in p.cmds:
            for a in cmd.args:
                if a[0] == "field" and field in a[1] or a[0] == "var" and field in a[2]:
                    return True
                if a[0] == "pipe" and (pipe_uses(a[1]) or field in a[2]):
                    return True
        return False

    for n in nodes:
        if isinstance(n, Out) and pipe_uses(n.pipe):
            return True
        if isinstance(n, If) and (pipe_uses(n.pipe) or _uses(n.then, field) or _uses(n.other, field)):
            return True
        if isinstance(n, Range) and (pipe_uses(n.pipe) or _uses(n.body, field) or _uses(n.other, field)):
            return True
    return False


def execute(nodes: list[Any], data: dict[str, Any], cut: bool = False, budget: Budget | None = None) -> str:
    r = _Render(data, cut, budget or Budget())
    try:
        r.run(nodes, data)
    except _Cut:
        pass
    except (_Break, _Continue):
        raise TemplateError("break or continue outside a range") from None
    except TemplateError:
        raise
    except RecursionError:
        raise TemplateError("the template nests too deeply") from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, OverflowError) as exc:
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    return "".join(r.out)


def render(src: str, messages: list[dict[str, Any]], tools: list[Any] | None = None, think: bool = False,
           max_chars: int = MAX_CHARS) -> str:
    """The prompt for ``messages`` (role and text content), as Ollama renders the template:
    at most ``max_chars`` characters of it, in at most ``MAX_STEPS`` steps for all of it."""
    nodes = compile_template(src)
    budget = Budget(max_chars)
    system_parts: list[str] = []
    collated: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role", ""), m.get("content") or ""
        if role == "system":
            system_parts.append(content)
        if collated and collated[-1]["Role"] == role:
            collated[-1]["Content"] += "\n\n" + content
        else:
            collated.append({"Role": role, "Content": content, "ToolCalls": None, "Thinking": ""})
    system = "\n\n".join(system_parts)
    if _uses(nodes, "Messages"):
        return execute(nodes, {"System": system, "Messages": collated, "Tools": tools, "Response": "",
                               "Think": think, "Prompt": "", "Suffix": ""}, budget=budget)
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}

    def flush() -> None:
        out.append(execute(nodes, {**turn, "Think": think, "Tools": tools, "Messages": None, "Suffix": ""},
                           budget=budget))
        turn.update(System="", Prompt="", Response="")

    for m in collated:
        if m["Role"] == "system":
            if turn["Prompt"] or turn["Response"]:
                flush()
            turn["System"] = m["Content"]
        elif m["Role"] == "user":
            if turn["Response"]:
                flush()
            turn["Prompt"] = m["Content"]
        elif m["Role"] == "assistant":
            turn["Response"] = m["Content"]
    out.append(execute(nodes, {**turn, "Think": think, "Tools": tools, "Messages": None, "Suffix": ""}, cut=True,
                       budget=budget))
    return "".join(out)


def templated(chat: ChatRequest, src: str, max_chars: int = MAX_CHARS) -> ChatRequest:
    """A chat request for a model with its own TEMPLATE: its messages rendered into one raw
    prompt (which the response cache then keys on), of at most ``max_chars`` characters."""
    p = chat.params
    if p.tools:
        raise InvalidRequest("tools: this model was created with its own TEMPLATE, rendered as a plain prompt; "
                             "tool calls need the model's own chat template", param="tools")
    if p.response_format:
        raise InvalidRequest("format: this model was created with its own TEMPLATE, rendered as a plain prompt, "
                             "which anyad does not hold to a format", param="format")
    messages = []
    for i, m in enumerate(chat.messages):
        content = m.get("content")
        if isinstance(content, list):
            if any(not isinstance(x, dict) or x.get("type") != "text" for x in content):
                raise InvalidRequest("this model was created with its own TEMPLATE: its messages are text only",
                                     param=f"messages[{i}].content")
            content = "".join(x.get("text") or "" for x in content)
        messages.append({"role": m.get("role"), "content": content or ""})
    try:
        prompt = render(src, messages, think=p.reasoning_effort not in (None, "none"), max_chars=max_chars)
    except TemplateError as exc:
        raise InvalidRequest(f"the model's TEMPLATE cannot render these messages: {exc}", param="messages") from None
    return replace(chat, raw=True, messages=[{"role": "user", "content": prompt}],
                   params=replace(p, reasoning_effort=None), body={**chat.body, "prompt": prompt})
