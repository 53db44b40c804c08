"""POST /v1/completions: raw prompts continued, through the official client, local and relayed."""

from __future__ import annotations

import asyncio

import openai
import pytest

from conftest import MODEL_ID
from anyad.config import parse_settings
import ggufmaker


async def test_a_raw_prompt_is_continued_stream_and_not(sdk):
    r = await sdk.completions.create(model=MODEL_ID, prompt="Once upon", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    (choice,) = r.choices
    assert choice.text and choice.finish_reason == "length" and r.usage.completion_tokens == 5
    # No chat template around it: the prompt is its own few tokens, fewer than as a chat turn.
    chat = await sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Once upon"}],
                                             max_tokens=1)
    assert r.usage.prompt_tokens < chat.usage.prompt_tokens
    text, finish = "", None
    async for chunk in await sdk.completions.create(model=MODEL_ID, prompt="Once upon", max_tokens=5,
                                                    temperature=0, stream=True):
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    assert text == choice.text and finish == "length"


async def test_max_tokens_defaults_to_openais_16(sdk):
    r = await sdk.completions.create(model=MODEL_ID, prompt="a", temperature=0)
    assert r.usage.completion_tokens <= 16
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 16


async def test_echo_logprobs_and_several_prompts(sdk):
    r = await sdk.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Hi") and len(r.choices[0].text) > 2

    r = await sdk.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 4
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    one = await sdk.completions.create(model=MODEL_ID, prompt="a", max_tokens=2)
    r = await sdk.completions.create(model=MODEL_ID, prompt=["a", "b c"], n=2, max_tokens=2, temperature=1.0,
                                     seed=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 2 * one.usage.prompt_tokens - 1


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 3}, "best_of"), ({"echo": True, "logprobs": 1}, "echo"), ({"logprobs": 6}, "logprobs"),
    ({"suffix": "end"}, "suffix"), ({"max_tokens": 0}, "max_tokens"), ({"prompt": []}, "prompt"),
])
async def test_what_cannot_be_honoured_is_a_400_naming_it(client, extra, param):
    r = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "a", "max_tokens": 2, **extra})
    assert r.status == 400
    assert (await r.json())["error"]["param"] == param


async def test_suffix_fills_the_middle_on_a_model_with_fim_tokens(make_client, tmp_path):
    model = ggufmaker.write_model(tmp_path / "coder.gguf", fim=True)
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "models": {"coder": {"path": str(model)}}}))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    plain = await sdk.completions.create(model="coder", prompt="def f(", max_tokens=2)
    r = await sdk.completions.create(model="coder", prompt="def f(", suffix="return x", max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    # The prefix, the suffix and the three FIM tokens.
    suffix_only = await sdk.completions.create(model="coder", prompt="return x", max_tokens=1)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens + suffix_only.usage.prompt_tokens + 3
    await sdk.close()


async def test_a_provider_gets_the_completion_as_one(make_client, start_fake, tmp_path):
    from fakes import REPLY

    fake, url = await start_fake()
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "providers": {"up": {"base_url": url, "models": ["gpt-i"]}}}))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    r = await sdk.completions.create(model="up/gpt-i", prompt=["x", "y"], logprobs=1, max_tokens=9)
    assert fake.requests[-1]["prompt"] == ["x", "y"] and fake.requests[-1]["model"] == "gpt-i"
    assert [ch.text for ch in r.choices] == [REPLY, REPLY]
    assert "".join(r.choices[1].logprobs.tokens) == REPLY
    texts: dict[int, str] = {}
    async for chunk in await sdk.completions.create(model="up/gpt-i", prompt="x", n=2, stream=True, max_tokens=9):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == {0: REPLY, 1: REPLY}
    assert fake.requests[-1]["prompt"] == "x"
    await sdk.close()


async def test_several_prompts_are_never_answered_from_the_cache(client):
    body = {"model": MODEL_ID, "prompt": ["a", "b"], "max_tokens": 2, "temperature": 0}
    for _ in range(2):
        r = await client.post("/v1/completions", json=body)
        assert r.status == 200 and r.headers["X-Anyad-Cache"] == "bypass"
        assert len((await r.json())["choices"]) == 2
    one = {"model": MODEL_ID, "prompt": "a", "max_tokens": 2, "temperature": 0}
    first = await (await client.post("/v1/completions", json=one)).json()
    await asyncio.to_thread(client.daemon.store.flush)  # the cache is written off the request's path
    again = await client.post("/v1/completions", json=one)
    assert again.headers["X-Anyad-Cache"] == "hit"
    assert (await again.json())["choices"][0]["text"] == first["choices"][0]["text"]


async def test_an_empty_prompt_is_a_400_not_a_crash(client):
    r = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "", "max_tokens": 2})
    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
    r = await client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "a", "max_tokens": 2})
    assert r.status == 200
