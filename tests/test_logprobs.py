"""logprobs and top_logprobs on a local model, in OpenAI's shape, through the official client."""

from __future__ import annotations

import math

import openai
import pytest

from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hello"}]


def check_entries(entries, content: str, top: int) -> None:
    # The tokens' bytes are the reply, whole and in order.
    assert b"".join(bytes(e.bytes) for e in entries).decode() == content
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == top
        alts = [a.logprob for a in e.top_logprobs]
        assert alts == sorted(alts, reverse=True)
        assert sum(math.exp(a) for a in alts) <= 1 + 1e-6
        # Greedy decoding (temperature 0, no penalties) picks the most likely token.
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


async def test_logprobs_non_stream_and_stream_agree(sdk):
    kw = dict(model=MODEL_ID, messages=MSGS, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    r = await sdk.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens == 6
    check_entries(entries, choice.message.content, 3)

    streamed, text = [], ""
    async for chunk in await sdk.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                streamed += chunk.choices[0].logprobs.content
    assert text == choice.message.content
    assert [e.token for e in streamed] == [e.token for e in entries]
    # The second request reads the prompt again from the cached prefix: with flash attention
    # the sums run in another order, so the values agree to a few parts in ten thousand.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=5e-3)


async def test_logprobs_without_alternatives_and_without_asking(sdk):
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=4, temperature=0,
                                          logprobs=True)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 4 and all(e.top_logprobs == [] for e in entries)
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("extra, param", [({"top_logprobs": 2}, "top_logprobs"),
                                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")])
async def test_bad_logprobs_requests_are_400s(sdk, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, **extra)
    assert e.value.param == param


async def test_a_logprobs_request_is_never_answered_from_the_cache(client):
    body = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 3, "temperature": 0, "logprobs": True}
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        assert resp.headers["X-Anyad-Cache"] == "bypass"
        assert len((await resp.json())["choices"][0]["logprobs"]["content"]) == 3


@pytest.fixture
async def ollama_client(make_client, tiny_model, tmp_path):
    import ollama

    from anyad.config import parse_settings
    from anyad.plugins import ollama as ollama_plugin

    s = parse_settings({"data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
                        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}})
    c = await make_client(s)
    await c.daemon.scheduler.load(MODEL_ID)
    host, port = ollama_plugin.address(c.daemon)
    return ollama.AsyncClient(host=f"http://{host}:{port}")


async def test_ollama_client_gets_logprobs_stream_and_non_stream(ollama_client):
    kw = dict(model=MODEL_ID, messages=MSGS, logprobs=True, top_logprobs=2,
              options={"num_predict": 5, "temperature": 0})
    r = await ollama_client.chat(**kw)
    assert len(r.logprobs) == r.eval_count == 5
    assert "".join(e.token for e in r.logprobs) == r.message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in r.logprobs)

    streamed, text = [], ""
    async for part in await ollama_client.chat(**kw, stream=True):
        text += part.message.content or ""
        streamed += part.logprobs or []
    assert text == r.message.content
    assert [e.token for e in streamed] == [e.token for e in r.logprobs]

    g = await ollama_client.generate(model=MODEL_ID, prompt="hello", logprobs=True,
                                     options={"num_predict": 3, "temperature": 0})
    assert len(g.logprobs) == 3 and all(e.top_logprobs in (None, []) for e in g.logprobs)
