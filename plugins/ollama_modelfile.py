"""Ollama's Modelfile, and the model defaults it sets.

A Modelfile is a list of commands, one per line (``#`` starts a comment line):
``FROM <path or model>``, ``PARAMETER <name> <value>``, ``SYSTEM``, ``TEMPLATE``, ``LICENSE``
and ``MESSAGE <role> <content>``; a value may be written bare (to the end of the line),
in ``"quotes"`` or across lines in ``\"\"\"triple quotes\"\"\"``. ``/api/create`` takes one as
``modelfile`` or the same things as fields (``from``, ``parameters``, ``system``, ...).

PARAMETERs are typed as Ollama types them and checked as a request's ``options`` are
(``anyad.fields``): what anyad refuses in a request it refuses here too, at create time.
Sampling ones are the model's defaults, a request's own options override them; the
context, batch and thread counts are the model's load settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anyad.errors import InvalidRequest
from anyad.fields import OLLAMA_OPTIONS, check_ollama

COMMANDS = ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE", "REQUIRES")
INTS = {"num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "mirostat", "num_ctx", "num_batch", "num_gpu",
        "main_gpu", "num_thread", "draft_num_predict"}
FLOATS = {"top_p", "min_p", "typical_p", "tfs_z", "temperature", "repeat_penalty", "presence_penalty",
          "frequency_penalty", "mirostat_tau", "mirostat_eta"}
BOOLS = {"penalize_newline", "numa", "use_mmap", "use_mlock", "low_vram", "f16_kv", "vocab_only", "logits_all",
         "embedding_only"}
KNOWN = {f.name for f in OLLAMA_OPTIONS}
# A PARAMETER that becomes a load setting of the created model (anyad's ModelSettings field).
LOAD = {"num_ctx": "n_ctx", "num_batch": "n_batch", "num_thread": "n_threads"}
# Sampling defaults: the Ollama option → (the chat body's field, SamplingParams' field).
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repeat_penalty": "repeat_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_tokens"}
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Modelfile:
    """What a create request asks for, from a Modelfile or the request's fields."""

    from_: str | None = None
    template: str | None = None
    system: str | None = None
    license: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)


def _bad(msg: str, param: str = "modelfile") -> InvalidRequest:
    return InvalidRequest(msg, param=param)


def _value(text: str, i: int, line: int) -> tuple[str, int]:
    """The value that starts at ``text[i]``: triple-quoted, quoted or bare; (value, end)."""
    if text.startswith('"""', i):
        end = text.find('"""', i + 3)
        if end < 0:
            raise _bad(f'modelfile line {line}: a """ is not closed')
        return text[i + 3:end], end + 3
    if text.startswith('"', i):
        out, j = [], i + 1
        while j < len(text) and text[j] not in '"\n':
            if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in '"\\':
                j += 1
            out.append(text[j])
            j += 1
        if j >= len(text) or text[j] != '"':
            raise _bad(f'modelfile line {line}: a " is not closed')
        return "".join(out), j + 1
    end = text.find("\n", i)
    end = len(text) if end < 0 else end
    return text[i:end].strip(), end


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 6 and s.startswith('"""') and s.endswith('"""'):
        return s[3:-3]
    if len(s) >= 2 and s.startswith('"') and s.endswith('"'):
        return s[1:-1]
    return s


def parse(text: Any) -> Modelfile:
    """A Modelfile's commands; a 400 naming the line for anything Ollama would not take."""
    if not isinstance(text, str):
        raise _bad("modelfile must be a string")
    mf = Modelfile()
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        line = text.count("\n", 0, i) + 1
        if text[i] == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        j = i
        while j < n and not text[j].isspace():
            j += 1
        command = text[i:j].upper()
        if command not in COMMANDS:
            raise _bad(f"modelfile line {line}: unknown command {text[i:j][:40]!r} (expected one of "
                       f"{', '.join(COMMANDS)})")
        while j < n and text[j] in " \t":
            j += 1
        if command in ("PARAMETER", "MESSAGE"):
            k = j
            while k < n and not text[k].isspace():
                k += 1
            key = text[j:k]
            while k < n and text[k] in " \t":
                k += 1
            value, i = _value(text, k, line)
            if not key:
                raise _bad(f"modelfile line {line}: {command} needs a name and a value")
            if command == "PARAMETER":
                add_parameter(mf.parameters, key, value, f"modelfile line {line}: PARAMETER")
            else:
                add_message(mf.messages, key, value, f"modelfile line {line}: MESSAGE")
            continue
        value, i = _value(text, j, line)
        if command == "FROM":
            if mf.from_ is not None:
                raise _bad(f"modelfile line {line}: a second FROM")
            mf.from_ = _unquote(value)
        elif command == "TEMPLATE":
            mf.template = value
        elif command == "SYSTEM":
            mf.system = value
        elif command == "LICENSE":
            mf.license.append(value)
        elif command == "ADAPTER":
            mf.adapters.append(value)
        # REQUIRES (the Ollama version a model needs) asks nothing of anyad.
    return mf


def typed(name: str, value: Any, where: str) -> Any:
    """A PARAMETER's value as Ollama types it (a Modelfile's are strings, a request's JSON)."""
    if name not in KNOWN:
        raise _bad(f"{where}: unknown parameter {name[:40]!r}", "parameters")
    try:
        if name == "stop":
            if isinstance(value, list) and all(isinstance(s, str) for s in value):
                return value
            if isinstance(value, str):
                return [_unquote(value)]
            raise ValueError
        if name in INTS:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if name in FLOATS:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            return float(value)
        if name in BOOLS:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
    except (ValueError, OverflowError):
        kind = "a list of strings" if name == "stop" else "an integer" if name in INTS else \
            "a number" if name in FLOATS else "true or false"
        raise _bad(f"{where}: {name} must be {kind}, not {str(value)[:40]!r}", "parameters") from None
    return value


def add_parameter(params: dict[str, Any], name: str, value: Any, where: str) -> None:
    v = typed(name, value, where)
    if name == "stop":  # stop repeats: each line adds one
        params["stop"] = [*params.get("stop", []), *v]
    else:
        params[name] = v


def add_message(messages: list[dict[str, str]], role: str, content: Any, where: str) -> None:
    if role.lower() not in ROLES:
        raise _bad(f"{where}: the role must be one of {', '.join(ROLES)}, not {role[:40]!r}", "messages")
    if not isinstance(content, str):
        raise _bad(f"{where}: the content must be a string", "messages")
    messages.append({"role": role.lower(), "content": content})


def from_request(body: dict[str, Any]) -> Modelfile:
    """A create request's Modelfile: its ``modelfile`` text, then its fields over it."""
    mf = parse(body["modelfile"]) if body.get("modelfile") is not None else Modelfile()
    if body.get("from") is not None:
        if not isinstance(body["from"], str) or not body["from"]:
            raise _bad("from must be a model name or a path", "from")
        mf.from_ = body["from"]
    for key in ("template", "system"):
        if body.get(key) is not None:
            if not isinstance(body[key], str):
                raise _bad(f"{key} must be a string", key)
            setattr(mf, key, body[key])
    lic = body.get("license")
    if lic is not None:
        if isinstance(lic, str):
            lic = [lic]
        if not isinstance(lic, list) or not all(isinstance(x, str) for x in lic):
            raise _bad("license must be a string or a list of strings", "license")
        mf.license = lic
    params = body.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _bad("parameters must be an object", "parameters")
        for k, v in params.items():
            if v is not None:
                mf.parameters[k] = typed(k, v, "parameters")
    msgs = body.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list):
            raise _bad("messages must be a list", "messages")
        mf.messages = []
        for m in msgs:
            if not isinstance(m, dict):
                raise _bad("each message must be an object with role and content", "messages")
            add_message(mf.messages, str(m.get("role", "")), m.get("content"), "messages")
    if body.get("adapters"):
        mf.adapters = list(body["adapters"]) if isinstance(body["adapters"], dict) else [str(body["adapters"])]
    return mf


def check_parameters(params: dict[str, Any]) -> None:
    """What anyad refuses in a request's options it refuses as a model's PARAMETER too, and
    the sampling values must be what a request may ask (temperature 0 to 2, ...)."""
    try:
        check_ollama({"options": params}, "generate")
    except InvalidRequest as exc:
        raise _bad(exc.message.replace("options.", "PARAMETER ", 1), "parameters") from None
    from anyad.schemas import parse_chat_request

    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for name, dst in SAMPLING.items():
        if name in params and not (name == "num_predict" and params[name] <= 0):
            body[dst] = params[name]
    try:
        parse_chat_request(body)
    except InvalidRequest as exc:
        raise _bad(f"PARAMETER {exc.message}", "parameters") from None
    seed = params.get("seed")
    if seed is not None and not -(1 << 63) <= seed < (1 << 63):  # the engine's is 64 bits at most
        raise _bad("PARAMETER seed must be a 64-bit integer", "parameters")
    for name, dst in LOAD.items():
        if name in params and params[name] < (16 if name == "num_ctx" else 1):
            raise _bad(f"PARAMETER {name} must be at least {16 if name == 'num_ctx' else 1}", "parameters")


def render(mf_from: str, params: dict[str, Any], system: str | None, template: str | None,
           messages: list[dict[str, str]], license_: list[str]) -> str:
    """A Modelfile for ``/api/show``, as Ollama writes one."""
    lines = [f"FROM {mf_from}"]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for k, v in params.items():
        for item in v if isinstance(v, list) else [v]:
            lines.append(f"PARAMETER {k} {_show(item)}")
    for m in messages:
        lines.append(f'MESSAGE {m["role"]} """{m["content"]}"""')
    for lic in license_:
        lines.append(f'LICENSE """{lic}"""')
    return "\n".join(lines) + "\n"


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"' if (not v or any(c.isspace() for c in v)) else v
    return str(v)


def parameters_text(params: dict[str, Any]) -> str:
    """``/api/show``'s ``parameters``: one ``name value`` a line."""
    return "\n".join(f"{k:<30} {_show(item)}" for k, v in params.items()
                     for item in (v if isinstance(v, list) else [v]))
