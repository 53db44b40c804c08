"""Tool-call and reasoning parsing per model family, and calls forced by a grammar.

The replies below are written the way the real models write them (Qwen 2.5 puts the
JSON on its own line, Llama 3.1 may or may not lead with <|python_tag|>, Qwen3 thinks
first). Every case is fed whole and in 1-3 character pieces, and must come out the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from anyad.errors import InvalidRequest
from anyad.toolcalls import Event, Family, ReplyParser, family_of, forced_call_grammar, opens_reasoning

TEMPLATES = Path(__file__).parent / "templates"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


QWEN25 = family_of(template("hermes-qwen2.5-7b-instruct"))
HERMES3 = family_of(template("hermes-hermes-3-llama-3.1-8b"))
QWEN3 = family_of(template("hermes-qwen3-0.6b"))
LLAMA31 = family_of(template("llama3-llama-3.1-8b-instruct"))
LLAMA32 = family_of(template("llama3-llama-3.2-3b-instruct"))
NEMO = family_of(template("mistral-mistral-nemo-instruct-2407"))
R1 = family_of(template("generic-deepseek-r1-distill-qwen-32b"))
GENERIC = Family("generic", None, None)


# -- family_of ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.jinja")), ids=lambda p: p.stem)
def test_every_fixture_is_recognised_as_the_family_in_its_name(path: Path) -> None:
    assert family_of(path.read_text()).name == path.stem.split("-")[0]


def test_reasoning_tags_and_thinking_switch_come_from_the_template() -> None:
    assert QWEN3.reasoning == ("<think>", "</think>") and QWEN3.thinking_switch == "enable_thinking"
    assert R1.reasoning == ("<think>", "</think>") and R1.thinking_switch is None
    assert QWEN25.reasoning is None and LLAMA31.reasoning is None and NEMO.reasoning is None


def test_a_template_without_tools_is_none_and_the_override_wins() -> None:
    import ggufmaker

    assert family_of(ggufmaker.CHATML_TEMPLATE).name == "none"
    assert family_of(None).name == "none"
    assert family_of(ggufmaker.CHATML_TEMPLATE, override="hermes").name == "hermes"
    forced = family_of(template("hermes-qwen3-0.6b"), override="generic")
    assert forced.name == "generic" and forced.reasoning == ("<think>", "</think>")
    with pytest.raises(ValueError, match="hermes"):
        family_of("", override="qwen")


def test_the_deepseek_prompt_opens_the_thinking_block_and_qwen3_without_thinking_closes_it() -> None:
    assert opens_reasoning(R1, "<｜User｜>hi<｜Assistant｜><think>\n")
    assert not opens_reasoning(QWEN3, "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_reasoning(QWEN25, "<|im_start|>assistant\n")


def test_a_gguf_carries_the_template_it_was_written_with(tmp_path: Path) -> None:
    import ggufmaker
    import llama_cpp

    path = ggufmaker.write_model(tmp_path / "qwen3.gguf", chat_template=template("hermes-qwen3-0.6b"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    assert family_of(llm.metadata["tokenizer.chat_template"]) == QWEN3


# -- ReplyParser --------------------------------------------------------------------


def parse(family: Family, text: str, step: int = 0, **kw) -> tuple[list[Event], str | None, int]:
    kw.setdefault("tools", True)
    kw.setdefault("reasoning", True)
    p = ReplyParser(family, **kw)
    events: list[Event] = []
    if step:
        for i in range(0, len(text), step):
            events += p.feed(text[i:i + step])
    else:
        events += p.feed(text)
    rest, note = p.close()
    return events + rest, note, p.calls


def collapse(events: list[Event]) -> tuple[str, str, list[tuple[str, dict]]]:
    """Content, reasoning and the calls, checking that the deltas have OpenAI's shape."""
    calls: dict[int, dict] = {}
    for e in events:
        for d in e.tool_calls or []:
            i = d["index"]
            if i not in calls:
                assert i == len(calls), "indexes run 0, 1, 2 … in order"
                assert re.fullmatch(r"call_[A-Za-z0-9]{24}", d["id"]) and d["type"] == "function"
                assert d["function"]["name"] and d["function"]["arguments"] == ""
                calls[i] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[i]["arguments"] += d["function"]["arguments"]
    out = []
    for c in calls.values():
        args = json.loads(c["arguments"])
        assert isinstance(args, dict)
        out.append((c["name"], args))
    return "".join(e.text for e in events), "".join(e.reasoning for e in events), out


WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"tz": "Europe/Paris"})

# (id, family, reply, parser options, content, reasoning, calls, a word of the note or None)
CASES = [
    ("qwen2.5 one call", QWEN25,
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     {}, "", "", [WEATHER], None),
    ("qwen2.5 text then two calls", QWEN25,
     "Let me check both.\n<tool_call>\n"
     '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     {}, "Let me check both.", "", [WEATHER, TIME], None),
    ("hermes 3 arguments as a string of JSON", HERMES3,
     '<tool_call>\n{"arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}", "name": "get_weather"}\n'
     "</tool_call>", {}, "", "", [WEATHER], None),
    ("hermes text after the call", QWEN25,
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>\nDone.',
     {}, "Done.", "", [TIME], None),
    ("hermes plain answer with a stray <", QWEN25, "1 < 2 and <b>bold</b>\n", {},
     "1 < 2 and <b>bold</b>\n", "", [], None),
    ("qwen3 thinks then calls", QWEN3,
     "<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n"
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     {}, "", "The user wants the weather in Paris. I should call get_weather.", [WEATHER], None),
    ("qwen3 thinks then answers", QWEN3, "<think>\nEasy.\n\nIt is 4.\n</think>\n\n2 + 2 = 4.", {},
     "2 + 2 = 4.", "Easy.\n\nIt is 4.", [], None),
    ("qwen3 reasoning inline", QWEN3, "<think>\nEasy.\n</think>\n\n2 + 2 = 4.", {"reasoning_inline": True},
     "<think>\nEasy.\n</think>\n\n2 + 2 = 4.", "", [], None),
    ("qwen3 a <tool_call> while thinking is thought, not a call", QWEN3,
     '<think>\nI could write <tool_call> here.\n</think>\n\nNo call needed.', {},
     "No call needed.", "I could write <tool_call> here.", [], None),
    ("qwen3 without reasoning parsing keeps the tags", QWEN3, "<think>\nhm\n</think>\n\nok",
     {"reasoning": False}, "<think>\nhm\n</think>\n\nok", "", [], None),
    ("deepseek r1: the prompt opened <think>", R1, "Okay, 2 + 2.\n</think>\n\nThe answer is 4.",
     {"started_in_reasoning": True, "tools": False}, "The answer is 4.", "Okay, 2 + 2.", [], None),
    ("deepseek r1 inline gets its opening tag back", R1, "Okay.\n</think>\n\n4.",
     {"started_in_reasoning": True, "reasoning_inline": True}, "<think>Okay.\n</think>\n\n4.", "", [], None),
    ("llama 3.1 bare JSON", LLAMA31,
     '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', {}, "", "", [WEATHER], None),
    ("llama 3.1 python_tag", LLAMA31,
     '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     {}, "", "", [WEATHER], None),
    ("llama 3.2 two calls separated by ;", LLAMA32,
     '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}', {}, "", "", [WEATHER, TIME], None),
    ("llama JSON that is an answer, not a call", LLAMA31, '{"city": "Paris", "population": 2102650}', {},
     '{"city": "Paris", "population": 2102650}', "", [], None),
    ("llama plain answer", LLAMA31, "Paris is the capital of France.", {},
     "Paris is the capital of France.", "", [], None),
    ("mistral list form", NEMO,
     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
     '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', {}, "", "", [WEATHER, TIME], None),
    ("mistral name[ARGS] form", NEMO,
     '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
     {}, "", "", [WEATHER, TIME], None),
    ("mistral list without the marker", NEMO,
     '[{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', {}, "", "", [TIME], None),
    ("mistral markdown list is text", NEMO, "[1] first\n[2] second", {}, "[1] first\n[2] second", "", [], None),
    ("generic object", GENERIC, '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}', {}, "", "", [TIME], None),
    ("generic tool_calls list", GENERIC,
     '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
     '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]}', {}, "", "", [WEATHER, TIME], None),
    ("no tools offered: a call-looking reply is text", QWEN25,
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', {"tools": False},
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "", [], None),
    # Broken calls come back as text, with the reason.
    ("hermes truncated JSON, unclosed tag", QWEN25,
     'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', {},
     'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "", [], "never closed"),
    ("hermes bad JSON inside closed tags", QWEN25,
     '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>', {},
     '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>', "", [], "JSON"),
    ("hermes name missing", QWEN25, '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', {},
     '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', "", [], "no name"),
    ("hermes arguments not an object", QWEN25, '<tool_call>\n{"name": "f", "arguments": "[1, 2]"}\n</tool_call>',
     {}, '<tool_call>\n{"name": "f", "arguments": "[1, 2]"}\n</tool_call>', "", [], "not a JSON object"),
    ("hermes one good call, one broken", QWEN25,
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', {},
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "", [TIME], "never closed"),
    ("hermes complete call whose closing tag is missing", QWEN25,
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}', {}, "", "", [TIME], None),
    ("two calls, parallel off", QWEN25,
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     {"parallel": False}, "", "", [WEATHER], "parallel_tool_calls"),
    ("llama truncated bare call", LLAMA31, '{"name": "get_weather", "parameters": {"city": "Par', {},
     '{"name": "get_weather", "parameters": {"city": "Par', "", [], "JSON"),
    ("llama python_tag with a builtin call", LLAMA31, '<|python_tag|>brave_search.call(query="paris")', {},
     '<|python_tag|>brave_search.call(query="paris")', "", [], "JSON"),
    ("mistral truncated", NEMO, '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "Eu', {},
     '[TOOL_CALLS][{"name": "get_time", "arguments": {"tz": "Eu', "", [], "JSON"),
    ("mistral [TOOL_CALLS] with nothing after it", NEMO, "[TOOL_CALLS]", {}, "[TOOL_CALLS]", "", [], "no tool call"),
]


@pytest.mark.parametrize("family,reply,opts,content,reasoning,calls,note",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("step", [0, 1, 2, 3], ids=["whole", "by1", "by2", "by3"])
def test_replies_parse_the_same_whole_and_in_pieces(family, reply, opts, content, reasoning, calls, note,
                                                   step) -> None:
    events, got_note, n = parse(family, reply, step, **opts)
    assert collapse(events) == (content, reasoning, calls)
    assert n == len(calls)
    if note is None:
        assert got_note is None
    else:
        assert got_note is not None and note in got_note


def test_plain_text_streams_at_once_and_only_a_possible_marker_waits() -> None:
    p = ReplyParser(QWEN25, tools=True, reasoning=True)
    assert [e.text for e in p.feed("The weather")] == ["The weather"]
    assert [e.text for e in p.feed(" today is")] == [" today is"]
    assert p.feed(" <tool") == []          # may be <tool_call>
    assert [e.text for e in p.feed("s>")] == [" <tools>"]
    assert p.feed("<tool_call>\n{\"name\": \"get_time\", ") == []
    events = p.feed('"arguments": {}}\n</tool_call>')
    assert collapse(events) == ("", "", [("get_time", {})])
    rest, note = p.close()
    assert rest == [] and note is None and p.calls == 1


def test_reasoning_streams_as_it_comes() -> None:
    p = ReplyParser(QWEN3, tools=True, reasoning=True)
    assert p.feed("<think>\n") == []
    assert [e.reasoning for e in p.feed("Let me")] == ["Let me"]
    assert [e.reasoning for e in p.feed(" see.")] == [" see."]
    assert p.feed("\n</thi") == []
    assert p.feed("nk>\n\n") == []
    assert [e.text for e in p.feed("Four.")] == ["Four."]


def test_each_call_gets_its_own_id() -> None:
    reply = CASES[1][2]
    events, _, _ = parse(QWEN25, reply)
    ids = [d["id"] for e in events for d in e.tool_calls or [] if "id" in d]
    assert len(ids) == 2 and len(set(ids)) == 2


# -- forced calls -------------------------------------------------------------------

SMALL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                          "days": {"type": "integer"}},
         "required": ["city", "days"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_forecast", "description": "Weather ahead", "parameters": SMALL}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}}, "required": ["tz"]}}},
]
NAMED = {"type": "function", "function": {"name": "get_forecast"}}


@pytest.fixture(scope="module")
def llm(tiny_model: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(tiny_model), n_ctx=512, verbose=False)


def grammar_parses(llm, grammar: str) -> bool:
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def check_forecast(args: dict) -> None:
    """SMALL, validated by hand (jsonschema is not a dependency)."""
    assert set(args) == {"city", "days"}
    assert isinstance(args["city"], str) and len(args["city"]) <= 12
    assert isinstance(args["days"], int) and not isinstance(args["days"], bool)


def test_the_parse_check_rejects_a_broken_grammar(llm) -> None:
    assert not grammar_parses(llm, 'root ::= "a" undefined-rule')


@pytest.mark.parametrize("family", [QWEN25, LLAMA31, NEMO, GENERIC, QWEN3], ids=lambda f: f.name)
@pytest.mark.parametrize("choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_forced_call_grammars_parse(llm, family, choice, parallel) -> None:
    assert grammar_parses(llm, forced_call_grammar(family, TOOLS, choice, parallel))


@pytest.mark.parametrize("family", [QWEN25, LLAMA31, NEMO, GENERIC], ids=lambda f: f.name)
def test_a_random_model_under_the_grammar_writes_a_call_that_matches_the_schema(llm, family) -> None:
    grammar = forced_call_grammar(family, TOOLS, NAMED, parallel=False)
    import llama_cpp

    out = llm.create_completion("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n",
                                grammar=llama_cpp.LlamaGrammar.from_string(grammar),
                                max_tokens=200, temperature=0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice["text"]
    events, note, n = parse(family, choice["text"])
    content, _, calls = collapse(events)
    assert note is None and content == "" and n == 1
    (name, args), = calls
    assert name == "get_forecast"
    check_forecast(args)


def test_a_prompt_that_opened_thinking_gets_it_closed_before_the_call(llm) -> None:
    import llama_cpp

    grammar = forced_call_grammar(R1, TOOLS[:1], "required", parallel=False, close_reasoning=True)
    out = llm.create_completion("<｜User｜>Weather in Oslo?<｜Assistant｜><think>\n",
                                grammar=llama_cpp.LlamaGrammar.from_string(grammar),
                                max_tokens=200, temperature=0)
    events, note, _ = parse(R1, out["choices"][0]["text"], started_in_reasoning=True)
    content, reasoning, calls = collapse(events)
    assert (content, reasoning, note) == ("", "", None)
    (name, args), = calls
    assert name == "get_forecast"
    check_forecast(args)


def test_a_named_choice_that_is_not_a_tool_is_the_clients_error() -> None:
    with pytest.raises(InvalidRequest) as e:
        forced_call_grammar(QWEN25, TOOLS, {"type": "function", "function": {"name": "nope"}}, False)
    assert e.value.param == "tool_choice" and "nope" in e.value.message
    with pytest.raises(InvalidRequest):
        forced_call_grammar(QWEN25, [], "required", False)
