"""POST /v1/embeddings: local GGUF models (llama.cpp embedding mode) and OpenAI-compatible providers."""

from __future__ import annotations

import math

import openai
import pytest

from anyad.config import parse_settings
from conftest import MODEL_ID
from fakes import FakeOpenAI


async def embed(client, **body):
    body.setdefault("model", MODEL_ID)
    return await client.post("/v1/embeddings", json=body)


async def test_local_embeddings(client):
    r = await embed(client, input=["the cat sat", "a dog ran far away", "the cat sat"])
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["object"] == "list" and body["model"] == MODEL_ID
    vecs = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(len(v) == 64 for v in vecs)  # the tiny model's embedding width
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs)  # unit length
    # The same text gives the same unit vector (to float32 rounding: a batch's kernels differ
    # by position on some CPUs); another text a different one.
    assert vecs[0] == pytest.approx(vecs[2], abs=1e-5) and vecs[0] != pytest.approx(vecs[1], abs=1e-2)
    assert body["usage"]["prompt_tokens"] > 0


async def test_local_embeddings_with_the_openai_sdk_and_generation_still_works(client):
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    r = await sdk.embeddings.create(model=MODEL_ID, input="hello there")  # the SDK asks for base64
    assert len(r.data[0].embedding) == 64
    plain = await sdk.embeddings.create(model=MODEL_ID, input="hello there", encoding_format="float")
    assert r.data[0].embedding == pytest.approx(plain.data[0].embedding, abs=1e-6)
    chat = await sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3)
    assert chat.usage.completion_tokens == 3
    await sdk.close()


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": [1, 2, 3]}, "input"),
    ({}, "input"),
])
async def test_bad_embedding_requests(client, body, param):
    r = await embed(client, **body)
    assert r.status == 400
    assert (await r.json())["error"]["param"] == param


async def test_remote_embeddings_relay_and_fallback(make_client, tiny_model, aiohttp_server):
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    c = await make_client(parse_settings({
        "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{server.port}/v1", "max_retries": 0}},
        "routes": [{"name": "emb", "targets": ["up/text-embed", MODEL_ID]}]}))
    r = await embed(c, model="up/text-embed", input=["a", "bbb"], dimensions=3)
    body = await r.json()
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == "up/text-embed"
    assert [d["embedding"] for d in body["data"]] == [[1.0, 0.5, -1.0], [3.0, 0.5, -1.0]]  # back in order
    assert body["usage"]["prompt_tokens"] == 10
    assert fake.requests[-1] == {"model": "text-embed", "input": ["a", "bbb"], "encoding_format": "float",
                                 "dimensions": 3}
    fake.mode = "down"
    r = await embed(c, model="emb", input="hello")
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == MODEL_ID
    assert "up/text-embed: 503" in r.headers["X-Anyad-Fallback"]
    assert len((await r.json())["data"][0]["embedding"]) == 64


async def test_anthropic_has_no_embeddings(make_client):
    c = await make_client(parse_settings({"providers": {"claude": {"backend": "anthropic",
                                                                   "base_url": "http://127.0.0.1:9/v1"}}}))
    r = await embed(c, model="claude/sonnet", input="x")
    assert r.status == 400 and "do not make embeddings" in (await r.json())["error"]["message"]
