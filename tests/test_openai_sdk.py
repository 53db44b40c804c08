"""The official openai package, pointed at anyad, just works."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hello"}]


async def test_sdk_non_stream(sdk):
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=6, temperature=0, seed=1)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6


async def test_sdk_stream_with_usage(sdk):
    full = (await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=8, temperature=0)
            ).choices[0].message.content
    stream = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == full
    assert finish == "length"
    assert usage.completion_tokens == 8


async def test_sdk_models_and_errors(sdk):
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    with pytest.raises(openai.NotFoundError) as e:
        await sdk.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, n=17)
    assert e.value.param == "n"


async def test_sdk_structured_output(sdk):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    r = await sdk.chat.completions.create(
        model=MODEL_ID, messages=MSGS, max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    import json

    assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)


async def test_sdk_retrieves_one_model_and_a_missing_one_is_404(sdk):
    m = await sdk.models.retrieve(MODEL_ID)
    assert m.id == MODEL_ID and m.object == "model" and m.owned_by == "local"
    with pytest.raises(openai.NotFoundError) as e:
        await sdk.models.retrieve("nope/not-a-model")
    assert e.value.code == "model_not_found"
