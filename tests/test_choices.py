"""n > 1: several choices from one reading of the prompt, local and relayed, stream and not."""

from __future__ import annotations

import openai
import pytest

from conftest import MODEL_ID
from anyad.config import parse_settings

MSGS = [{"role": "user", "content": "hello"}]


async def test_local_choices_non_stream(sdk):
    one = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=6, temperature=1.5, seed=7)
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=6, temperature=1.5, seed=7,
                                          n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in r.choices)
    # Each choice samples with its own seed (seed + index): not three copies of one.
    assert len({c.message.content for c in r.choices}) > 1
    # The prompt is counted (and read) once; the completions add up.
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 18


async def test_local_choices_stream(sdk):
    stream = await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=5, temperature=1.5,
                                               seed=3, n=2, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = {}, {}, None
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert sorted(texts) == [0, 1] and all(texts.values())
    assert finishes == {0: "length", 1: "length"}
    assert usage.completion_tokens == 10


@pytest.mark.parametrize("n", [0, 17])
async def test_n_out_of_range_is_a_400(sdk, n):
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2, n=n)
    assert e.value.param == "n"


async def test_several_choices_are_never_answered_from_the_cache(client):
    body = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 3, "temperature": 0, "n": 2}
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200 and resp.headers["X-Anyad-Cache"] == "bypass"
        assert len((await resp.json())["choices"]) == 2


async def test_a_providers_choices_are_relayed(make_client, start_fake, tmp_path):
    fake, url = await start_fake()
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "providers": {"up": {"base_url": url, "models": ["gpt-x"]}}}))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    r = await sdk.chat.completions.create(model="up/gpt-x", messages=MSGS, n=3)
    assert fake.requests[-1]["n"] == 3
    whole = [ch.message.content for ch in r.choices]
    assert whole[1:] == [whole[0] + " 1", whole[0] + " 2"]
    texts: dict[int, str] = {}
    async for chunk in await sdk.chat.completions.create(model="up/gpt-x", messages=MSGS, n=3, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert [texts[i] for i in range(3)] == whole
    # A provider answering fewer choices than asked is its failure, not a short answer.
    # (The fake streams a tool call as one choice whatever n is.)
    stream = await sdk.chat.completions.create(model="up/gpt-x", messages=MSGS, n=2, stream=True, tools=[{
        "type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.APIError, match="answered 1 of the 2 choices"):
        async for _ in stream:
            pass
    await sdk.close()


@pytest.mark.parametrize("kind", ["batched", "slots"])
def test_the_engine_reads_the_prompt_once_for_all_choices(tiny_model, kind):
    import llama_cpp

    from anyad.backends.llama_cpp.worker import Engine

    engine = Engine({"path": str(tiny_model), "n_ctx": 512, "n_threads": 1, "engine": kind})
    frames: list[dict] = []

    class Out:
        def write(self, frame):
            frames.append(frame)

    llm = engine.llm

    def read_so_far() -> int:
        if engine.ctx is not None:
            return engine.ctx.stats().prompt_tokens_read
        return llama_cpp.llama_perf_context(llm._ctx.ctx).n_p_eval

    before = read_so_far()
    engine.chat(llm, 1, MSGS, {"n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 1}, set(), Out())
    read = read_so_far() - before
    end = frames[-1]
    assert end["t"] == "end" and end["index"] == 2 and end["usage"]["completion_tokens"] == 12
    assert [f.get("index", 0) for f in frames if f["t"] == "finish"] == [0, 1]
    # The prompt once, not three times (a later choice reads its last token again, for the
    # logits of its first draw).
    assert end["usage"]["prompt_tokens"] - 1 <= read <= end["usage"]["prompt_tokens"] + 2
