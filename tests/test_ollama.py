"""The Ollama-compatible API (the first-party `ollama` plugin), driven by the official
`ollama` Python client over the same router, scheduler, history and cache."""

from __future__ import annotations

import asyncio
import json

import ollama
import pytest

from anyad.config import parse_settings
from anyad.plugins import ollama as ollama_plugin
from conftest import MODEL_ID
from eventually import until


@pytest.fixture
def api(gateway):
    """The official client on the gateway's Ollama listener; the test client and the fake ride along."""
    client = ollama.AsyncClient(host=gateway.ollama_url)
    client.anyad = gateway
    client.fake = gateway.fake
    return client


async def test_chat_streams_ndjson_and_answers_whole(api):
    parts = []
    async for part in await api.chat(model=MODEL_ID, messages=[{"role": "user", "content": "hello"}],
                                      stream=True, options={"num_predict": 8, "temperature": 0}):
        parts.append(part)
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count == 8 and last.prompt_eval_count > 0
    assert last.total_duration > 0
    streamed = "".join(p.message.content for p in parts)
    whole = await api.chat(model=MODEL_ID, messages=[{"role": "user", "content": "hello"}], stream=False,
                           options={"num_predict": 8, "temperature": 0})
    assert whole.done and whole.message.role == "assistant" and whole.message.content == streamed


async def test_generate_with_system_options_and_json_format(api):
    r = await api.generate(model=MODEL_ID, prompt="Give me JSON", system="You answer in JSON.", format="json",
                           options={"num_predict": 40, "temperature": 0, "seed": 1})
    assert r.done
    json.loads(r.response)  # the grammar held it to JSON (truncation aside: it closes within 40 tokens)
    parts = [p async for p in await api.generate(model=MODEL_ID, prompt="hi", stream=True,
                                                  options={"num_predict": 5})]
    assert parts[-1].done and parts[-1].eval_count == 5 and "".join(p.response for p in parts)


async def test_remote_models_answer_through_the_same_router(api):
    r = await api.chat(model="up/gpt-x", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert r.message.content == "Hello from the fake provider."
    assert api.fake.requests[-1]["model"] == "gpt-x"


async def test_tags_ps_show_and_version(api):
    tags = await api.list()
    names = [m.model for m in tags.models]
    assert MODEL_ID in names and "up/gpt-x" in names
    tiny = next(m for m in tags.models if m.model == MODEL_ID)
    assert tiny.size > 0 and tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert tiny.details.quantization_level in ("F16", "Q8_0")
    assert (await api.ps()).models == []
    # An empty chat loads the model, as with Ollama; keep_alive 0 unloads it.
    await api.chat(model=MODEL_ID, messages=[])
    ps = (await api.ps()).models
    assert [m.model for m in ps] == [MODEL_ID] and ps[0].size > 0 and ps[0].expires_at is not None
    await api.chat(model=MODEL_ID, messages=[], keep_alive=0)
    assert (await api.ps()).models == []
    show = await api.show(MODEL_ID)
    assert show.details.family == "llama" and "llama.context_length" in show.modelinfo
    assert "completion" in show.capabilities and "<|im_start|>" in (show.template or "")
    r = await api._client.get("/api/version")
    assert r.status_code == 200 and r.json()["version"]
    r = await api._client.get("/")
    assert r.text == "Ollama is running"


async def test_keep_alive_reaches_the_scheduler(api):
    await api.generate(model=MODEL_ID, prompt="hi", options={"num_predict": 2}, keep_alive="90s")
    entry = api.anyad.daemon.scheduler.models[MODEL_ID]
    assert entry.keep_alive == 90 and entry.state == "loaded"
    await api.generate(model=MODEL_ID, prompt="hi", options={"num_predict": 2}, keep_alive=0)
    await until(lambda: entry.state == "unloaded", what="the unload")


async def test_embed(api):
    r = await api.embed(model=MODEL_ID, input=["one", "two words"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) > 0 and r.prompt_eval_count > 0
    assert abs(sum(x * x for x in r.embeddings[0]) - 1.0) < 1e-3


async def test_errors_in_ollamas_shape_and_the_history_records(api):
    with pytest.raises(ollama.ResponseError) as err:
        await api.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "no-such-model" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        await api.chat(model=MODEL_ID, messages=[{"role": "wizard", "content": "hi"}])
    assert err.value.status_code == 400
    await api.chat(model=MODEL_ID, messages=[{"role": "user", "content": "remember me"}],
                   options={"num_predict": 3})
    c = api.anyad
    await asyncio.to_thread(c.daemon.store.flush)
    page = await (await c.get("/api/conversations?q=remember")).json()
    assert page["total"] == 1


async def test_a_keys_model_patterns_hold_on_the_ollama_api_too(make_client, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("U_KEY", "user-key-7")
    s = parse_settings({"data_dir": str(tmp_path / "data"),
                        "models": {MODEL_ID: {"path": str(tiny_model)}, "other": {"path": str(tiny_model)}},
                        "keys": {"u": {"key": "env:U_KEY", "models": [MODEL_ID]}},
                        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}})
    c = await make_client(s)
    host, port = ollama_plugin.address(c.daemon)
    api = ollama.AsyncClient(host=f"http://{host}:{port}", headers={"Authorization": "Bearer user-key-7"})
    assert [m.model for m in (await api.list()).models] == [MODEL_ID]
    for call in (lambda: api.chat(model="other", messages=[{"role": "user", "content": "hi"}]),
                 lambda: api.embed(model="other", input="hi"), lambda: api.show("other")):
        with pytest.raises(ollama.ResponseError) as err:
            await call()
        assert err.value.status_code == 403
    assert (await api.generate(model=MODEL_ID, prompt="hi", options={"num_predict": 2})).done
    nokey = ollama.AsyncClient(host=f"http://{host}:{port}")
    with pytest.raises(ollama.ResponseError) as err:
        await nokey.list()
    assert err.value.status_code == 401


async def test_a_request_access_refuses_never_reaches_the_request_hook(make_client, tiny_model, tmp_path,
                                                                       monkeypatch):
    """The plugin's ``anyad_before_request`` (Ollama's names and Modelfile defaults) runs after
    the access check, on every door; the model it rewrites a request to is checked too."""
    from anyad.plugins import ollama_models

    seen: list[str] = []
    real = ollama_models.before_request

    def spy(chat, daemon):
        seen.append(chat.model)
        return real(chat, daemon)

    monkeypatch.setattr(ollama_models, "before_request", spy)
    for name, key in (("U_KEY", "user-key-Hook1"), ("Q_KEY", "quota-key-Hook2"), ("L_KEY", "latest-key-Hook3")):
        monkeypatch.setenv(name, key)
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
        "models": {MODEL_ID: {"path": str(tiny_model)}, "other": {"path": str(tiny_model)}},
        "keys": {"u": {"key": "env:U_KEY", "models": [MODEL_ID]},
                 "q": {"key": "env:Q_KEY", "tokens_per_day": 1},
                 "l": {"key": "env:L_KEY", "models": ["*:latest"]}},
        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}}))
    host, port = ollama_plugin.address(c.daemon)
    hi = [{"role": "user", "content": "hi"}]

    async def status(key: str, model: str, door: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        if door == "ollama":
            r = await c.session.post(f"http://{host}:{port}/api/chat", headers=headers, json={
                "model": model, "messages": hi, "stream": False, "options": {"num_predict": 1}})
        elif door == "responses":
            r = await c.post("/v1/responses", headers=headers, json={"model": model, "input": "hi",
                                                                     "max_output_tokens": 1})
        else:
            r = await c.post("/v1/chat/completions", headers=headers, json={"model": model, "messages": hi,
                                                                            "max_tokens": 1})
        await r.read()
        return r.status

    doors = ("ollama", "chat", "responses")
    assert [await status("user-key-Hook1", "other", d) for d in doors] == [403, 403, 403]
    assert seen == []  # a model the key may not use: refused before the hook
    assert await status("quota-key-Hook2", MODEL_ID, "chat") == 200  # the day's one token, and more
    assert seen == [MODEL_ID]
    assert [await status("quota-key-Hook2", MODEL_ID, d) for d in doors] == [429, 429, 429]
    assert seen == [MODEL_ID]  # over its quota: refused before the hook
    # The hook takes "other:latest" for the configured "other", which "*:latest" does not admit.
    assert await status("latest-key-Hook3", "other:latest", "chat") == 403
    assert seen == [MODEL_ID, "other:latest"]
    assert [await status("user-key-Hook1", MODEL_ID, d) for d in doors] == [200, 200, 200]
    assert seen[2:] == [MODEL_ID] * 3
