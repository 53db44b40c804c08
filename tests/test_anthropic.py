"""The Anthropic backend translates both ways: OpenAI request → Messages API, and back."""

from __future__ import annotations

import json

import openai
import pytest

from anyad.config import parse_settings
from fakes import REPLY, FakeAnthropic

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
async def setup(make_client, aiohttp_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "sk-ant-test-secret")
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app())
    c = await make_client(parse_settings({"providers": {"claude": {
        "backend": "anthropic", "base_url": f"http://127.0.0.1:{server.port}/v1",
        "api_key": "env:ANTHROPIC_TEST_KEY", "models": ["sonnet"]}}}))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    yield fake, sdk
    await sdk.close()


async def test_request_translation(setup):
    fake, sdk = setup
    await sdk.chat.completions.create(
        model="claude/sonnet", max_tokens=50, temperature=1.7, stop=["END"], tools=TOOLS, tool_choice="required",
        user="u-7",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "toolu_0", "type": "function", "function": {"name": "get_weather",
                                                                         "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "toolu_0", "content": "12 C"},
                  {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]}])
    sent = fake.requests[-1]
    assert fake.headers[-1]["x-api-key"] == "sk-ant-test-secret"
    assert fake.headers[-1]["anthropic-version"] == "2023-06-01"
    assert sent["model"] == "sonnet" and sent["system"] == "Be brief."
    assert sent["max_tokens"] == 50 and sent["stop_sequences"] == ["END"] and sent["temperature"] == 1.0
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather now",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any"} and sent["metadata"] == {"user_id": "u-7"}
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [{"type": "tool_use", "id": "toolu_0", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]
    # The tool result and the next user turn merge into one user message, as Anthropic requires.
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_0", "content": "12 C"},
        {"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]


async def test_default_max_tokens_is_sent(setup):
    fake, sdk = setup
    await sdk.chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": "hi"}])
    assert fake.requests[-1]["max_tokens"] == 4096


async def test_reply_translation_non_stream(setup):
    _, sdk = setup
    r = await sdk.chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (21, 9, 30)
    r = await sdk.chat.completions.create(model="claude/sonnet", messages=[{"role": "user", "content": "hi"}],
                                          tools=TOOLS)
    (call,) = r.choices[0].message.tool_calls
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_1", "get_weather",
                                                                                  {"city": "Oslo"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content == "Let me check."


async def test_reply_translation_stream(setup):
    _, sdk = setup
    text, usage, finish = "", None, None
    async for ch in await sdk.chat.completions.create(model="claude/sonnet", stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "hi"}]):
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        usage = ch.usage or usage
    assert text == REPLY and finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (21, 9)

    args, name, finish = "", "", None
    async for ch in await sdk.chat.completions.create(model="claude/sonnet", stream=True, tools=TOOLS,
                                                      messages=[{"role": "user", "content": "hi"}]):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            assert tc.index == 0
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = (ch.choices[0].finish_reason if ch.choices else None) or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Oslo"} and finish == "tool_calls"


async def test_anthropic_errors_in_openai_shape(setup):
    _, sdk = setup
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model="claude/sonnet", max_tokens=200000,
                                          messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400
    assert e.value.body["message"] == "claude: max_tokens: too large"
    assert e.value.body["type"] == "invalid_request_error"


async def test_several_choices_are_a_400_naming_n(setup):
    fake, sdk = setup
    before = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model="claude/sonnet", max_tokens=5, n=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert e.value.param == "n" and "one reply per request" in e.value.message
    assert len(fake.requests) == before
