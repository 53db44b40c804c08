"""Tool calls and reasoning on local models, through the official openai client, on tiny
GGUFs that carry real model families' chat templates (tests/templates/)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from conftest import ASK, FAMILIES, TOOLS, WEATHER, openai_sdk, settings_for

MAX = 200


@pytest.fixture
def sdk_for(sdk_on, family_models):
    """An openai client on a daemon serving the named family models."""
    return lambda *names, **extra: sdk_on({n: family_models[n] for n in names}, openai_sdk, **extra)


def check_call(name: str, arguments: str) -> dict:
    """The call's arguments, checked against the tool's schema."""
    args = json.loads(arguments)
    if name == "weather":
        assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 8
    else:
        assert name == "clock" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")
    return args


async def streamed(sdk, model: str, **kw) -> tuple[list, str, str, str | None]:
    """(tool-call deltas, content, reasoning_content, finish_reason) of a streamed reply."""
    deltas, text, reasoning, finish = [], "", "", None
    async for chunk in await sdk.chat.completions.create(model=model, stream=True, **kw):
        choice = chunk.choices[0]
        deltas += choice.delta.tool_calls or []
        text += choice.delta.content or ""
        reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        finish = choice.finish_reason or finish
    return deltas, text, reasoning, finish


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_forced_call_is_a_valid_call_stream_and_not(sdk_for, family):
    sdk = await sdk_for(family)
    # "required": any tool, a whole reply.
    r = await sdk.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=MAX, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    check_call(call.function.name, call.function.arguments)

    # A named function, streamed: index, id and name come first, the arguments in pieces.
    deltas, text, _, finish = await streamed(
        sdk, family, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "clock"}},
        parallel_tool_calls=False, max_tokens=MAX, temperature=0)
    assert finish == "tool_calls" and text == ""
    first = deltas[0]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == "clock"
    assert all(d.index == 0 and d.id is None and not d.function.name for d in deltas[1:])
    check_call("clock", "".join(d.function.arguments or "" for d in deltas))
    if family == "hermes":
        # Forced by a grammar, the call cannot come out malformed: its arguments stream as the
        # model writes them (a token a piece), not in one piece when the call has closed.
        pieces = [d.function.arguments for d in deltas[1:] if d.function.arguments]
        assert len(pieces) > 3


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_agent_round_trip_renders_through_the_template(sdk_for, family):
    """call → tool result → answer: the assistant's call (ids as another provider writes
    them) and the tool message render through the family's own template."""
    sdk = await sdk_for(family)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_Xy12abcDEF34", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_Xy12abcDEF34", "content": '{"sky": "clear", "c": 21}'}]
    r = await sdk.chat.completions.create(model=family, messages=history, tools=TOOLS, max_tokens=6,
                                          temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # The arguments reached the template as an object: a second round renders too.
    r2 = await sdk.chat.completions.create(
        model=family, messages=history + [{"role": "assistant", "content": "Clear, 21 degrees."},
                                          {"role": "user", "content": "And the time in UTC?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "clock"}}, parallel_tool_calls=False,
        max_tokens=MAX, temperature=0)
    assert r2.choices[0].finish_reason == "tool_calls"
    check_call("clock", r2.choices[0].message.tool_calls[0].function.arguments)


async def test_tool_choice_none_leaves_the_tools_out(sdk_for):
    sdk = await sdk_for("hermes")
    offered = await sdk.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, max_tokens=4,
                                                temperature=0)
    none = await sdk.chat.completions.create(model="hermes", messages=ASK, tools=TOOLS, tool_choice="none",
                                             max_tokens=4, temperature=0)
    plain = await sdk.chat.completions.create(model="hermes", messages=ASK, max_tokens=4, temperature=0)
    # The template wrote the tools into the prompt only when they were on offer.
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    assert none.choices[0].finish_reason == "length"


async def test_tool_requests_that_cannot_be_honoured_are_400s(sdk_for):
    sdk = await sdk_for("hermes")
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"reasoning_format": "sideways"}, "reasoning_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            await sdk.chat.completions.create(model="hermes", messages=ASK, max_tokens=4, extra_body=kw)
        assert e.value.param == param, (kw, e.value.body)


async def test_a_forced_call_beside_a_response_format_is_the_call(sdk_for):
    """Agents with a structured final output send both: this turn's answer is the call."""
    sdk = await sdk_for("hermes")
    r = await sdk.chat.completions.create(model="hermes", messages=ASK, max_tokens=200, tools=[WEATHER],
                                          tool_choice="required", parallel_tool_calls=False,
                                          response_format={"type": "json_object"})
    (call,) = r.choices[0].message.tool_calls
    check_call(call.function.name, call.function.arguments)
    assert r.choices[0].finish_reason == "tool_calls"


async def test_malformed_call_comes_back_as_text_with_the_reason(sdk_for):
    """A call broken off (here by a stop sequence inside it) is text, "stop", and a header saying why."""
    sdk = await sdk_for("hermes")
    raw = await sdk.chat.completions.with_raw_response.create(
        model="hermes", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        stop=[', "arguments"'], max_tokens=MAX, temperature=0)
    r = raw.parse()
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content.startswith("<tool_call>")
    assert "<tool_call> was never closed" in raw.headers["X-Anyad-Tool-Parse"]


async def test_fallback_from_a_failing_provider_keeps_tool_calls(sdk_for, start_fake):
    fake, url = await start_fake("500")
    sdk = await sdk_for("hermes", providers={"up": {"base_url": url, "max_retries": 0}},
                        routes=[{"name": "agent", "targets": ["up/big", "hermes"]}])
    raw = await sdk.chat.completions.with_raw_response.create(
        model="agent", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=MAX, temperature=0)
    r = raw.parse()
    assert raw.headers["X-Anyad-Backend"] == "hermes" and fake.requests  # the provider was tried first
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message.tool_calls[0].function.name, r.choices[0].message.tool_calls[0].function.arguments)
    deltas, _, _, finish = await streamed(sdk, "agent", messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=MAX, temperature=0)
    assert finish == "tool_calls" and deltas[0].function.name in ("weather", "clock")


async def test_reasoning_is_split_out_and_kept_apart_in_the_history(sdk_for):
    """DeepSeek-R1's template opens the thinking block itself: what the model writes is reasoning."""
    sdk = await sdk_for("r1")
    raw = await sdk.chat.completions.with_raw_response.create(model="r1", messages=ASK, max_tokens=8,
                                                              temperature=0)
    r = raw.parse()
    msg = r.choices[0].message
    assert msg.reasoning_content and not msg.content
    _, text, reasoning, finish = await streamed(sdk, "r1", messages=ASK, max_tokens=8, temperature=0)
    assert reasoning == msg.reasoning_content and text == "" and finish == "length"
    # Asked for inline, as llama.cpp's server names it: the thinking stays in the content.
    inline = await sdk.chat.completions.create(model="r1", messages=ASK, max_tokens=8, temperature=0,
                                               extra_body={"reasoning_format": "none"})
    assert inline.choices[0].message.content == "<think>" + msg.reasoning_content
    c = sdk.anyad
    await asyncio.to_thread(c.daemon.store.flush)
    conv = await (await c.get(f"/api/conversations/{raw.headers['X-Anyad-Conversation-Id']}")).json()
    reply = conv["messages"][-1]
    assert reply["role"] == "assistant" and reply["reasoning_content"] == msg.reasoning_content
    assert not reply["content"]


async def test_reasoning_effort_none_switches_thinking_off(sdk_for):
    """Qwen3's template has a switch (enable_thinking): off, it writes an empty thought into the prompt."""
    sdk = await sdk_for("qwen3")
    on = await sdk.chat.completions.create(model="qwen3", messages=ASK, max_tokens=2, temperature=0)
    off = await sdk.chat.completions.create(model="qwen3", messages=ASK, max_tokens=2, temperature=0,
                                            reasoning_effort="none")
    assert off.usage.prompt_tokens > on.usage.prompt_tokens
