"""Image parts on a local model with a vision projector, through the daemon: the official
openai client and the ollama client, and the 400s where an image cannot be read."""

from __future__ import annotations

import base64

import openai
import pytest

import mmprojmaker
from mmprojmaker import RED, STRIPES
from anyad.backends.llama_cpp import vision
from conftest import MODEL_ID, settings_for

pytestmark = pytest.mark.skipif(vision.unavailable_reason() is not None, reason=vision.unavailable_reason() or "")


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def look(image: bytes, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}}]}]


@pytest.fixture
async def seeing(make_client, tmp_path, tiny_model):
    """A daemon serving the tiny model with a projector (``eye``) and without (``tiny``)."""
    proj = mmprojmaker.make_mmproj(tmp_path / mmprojmaker.mmproj_name(tiny_model))
    s = settings_for(tmp_path, {MODEL_ID: tiny_model}, plugins={"enabled": ["ollama"], "ollama": {"port": 0}})
    s = s.model_copy(update={"models": {**s.models, "eye": s.models[MODEL_ID].model_copy(update={"mmproj": proj})}})
    c = await make_client(s)
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    sdk.anyad = c
    yield sdk
    await sdk.close()


async def test_an_image_reaches_the_model_stream_and_not(seeing):
    text_only = await seeing.chat.completions.create(model="eye", max_tokens=3, temperature=0,
                                                     messages=[{"role": "user", "content": "What is this?"}])
    r = await seeing.chat.completions.create(model="eye", messages=look(RED), max_tokens=3, temperature=0)
    # The image took its positions in the prompt.
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + mmprojmaker.TINY_VISION.n_patches
    streamed = ""
    async for chunk in await seeing.chat.completions.create(model="eye", messages=look(STRIPES), max_tokens=3,
                                                            temperature=0, stream=True):
        streamed += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert streamed
    models = {m.id: m for m in (await seeing.models.list()).data}
    assert models["eye"].model_extra.get("vision") is True and "vision" not in models[MODEL_ID].model_extra


@pytest.mark.parametrize("model, url, param", [
    (MODEL_ID, data_url(RED), "messages[0].content[1].type"),  # no projector: a 400, not a blind answer
    ("eye", "http://127.0.0.1:9/cat.png", "messages[0].content[1].image_url"),  # never fetched
    ("eye", "data:image/png;base64,@@@", "messages[0].content[1].image_url"),
    ("eye", data_url(b"not an image at all"), "messages"),
])
async def test_images_that_cannot_be_read_are_400s(seeing, model, url, param):
    with pytest.raises(openai.BadRequestError) as e:
        await seeing.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert e.value.param == param, e.value.body
    ok = await seeing.chat.completions.create(model="eye", messages=look(RED), max_tokens=1)
    assert ok.choices  # the worker lived through it


async def test_a_marker_in_the_text_is_not_an_image_place(seeing):
    r = await seeing.chat.completions.create(model="eye", max_tokens=1, messages=look(RED, "<__media__> twice?"))
    assert r.choices[0].finish_reason in ("length", "stop")


async def test_the_ollama_client_sends_images(seeing):
    import ollama

    from anyad.plugins import ollama as ollama_plugin

    await seeing.anyad.daemon.scheduler.load("eye")
    host, port = ollama_plugin.address(seeing.anyad.daemon)
    client = ollama.AsyncClient(host=f"http://{host}:{port}")
    r = await client.chat(model="eye", messages=[{"role": "user", "content": "What is this?", "images": [RED]}],
                          options={"num_predict": 2, "temperature": 0})
    plain = await client.chat(model="eye", messages=[{"role": "user", "content": "What is this?"}],
                              options={"num_predict": 2, "temperature": 0})
    assert r.prompt_eval_count == plain.prompt_eval_count + mmprojmaker.TINY_VISION.n_patches
    g = await client.generate(model="eye", prompt="What is this?", images=[STRIPES], options={"num_predict": 2})
    assert g.eval_count == 2


async def test_count_tokens_counts_an_image_as_the_reply_does(seeing):
    import anthropic

    claude = anthropic.AsyncAnthropic(base_url=str(seeing.anyad.make_url("")), api_key="x", max_retries=0)
    ask = dict(model="eye", messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(RED).decode()}},
        {"type": "text", "text": "What is this?"}]}])
    counted = await claude.messages.count_tokens(**ask)
    m = await claude.messages.create(**ask, max_tokens=1)
    assert counted.input_tokens == m.usage.input_tokens
    text_only = await claude.messages.count_tokens(model="eye", messages=[{"role": "user", "content": "What is this?"}])
    assert counted.input_tokens == text_only.input_tokens + mmprojmaker.TINY_VISION.n_patches
    await claude.close()
