"""The OpenAI chat-completions contract, against the real app and a real llama.cpp worker."""

from __future__ import annotations

import json


from conftest import MODEL_ID

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


async def post(client, path="/v1/chat/completions", **body):
    body.setdefault("model", MODEL_ID)
    body.setdefault("messages", MSGS)
    return await client.post(path, json=body)


async def complete(client, **body) -> dict:
    r = await post(client, **body)
    assert r.status == 200, await r.text()
    return await r.json()


async def sse_events(resp) -> list:
    """Every ``data:`` payload of an SSE reply, in order ([DONE] kept as a string)."""
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = []
    async for line in resp.content:
        line = line.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_non_stream_shape_and_usage(client):
    r = await post(client, max_tokens=12, temperature=0)
    assert r.status == 200
    assert r.headers["X-Anyad-Backend"] == MODEL_ID
    assert r.headers["X-Request-Id"]
    body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_ID
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 12
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


async def test_prompt_goes_through_the_models_chat_template(client):
    a = (await complete(client, max_tokens=1, messages=[{"role": "user", "content": "x"}]))["usage"]
    # ChatML wraps one message in <|im_start|>user\n … <|im_end|>\n<|im_start|>assistant\n
    # (each marker one special token): far more tokens than the one character sent.
    assert a["prompt_tokens"] >= 8
    b = (await complete(client, max_tokens=1, messages=[{"role": "user", "content": "x"},
                                                        {"role": "assistant", "content": "y"},
                                                        {"role": "user", "content": "z"}]))["usage"]
    assert b["prompt_tokens"] > a["prompt_tokens"] + 8


async def test_temperature_zero_is_deterministic_and_max_completion_tokens(client):
    a = await complete(client, max_completion_tokens=8, temperature=0)
    b = await complete(client, max_tokens=8, temperature=0)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] == 8
    # max_completion_tokens wins over the deprecated max_tokens, as in OpenAI's API.
    c = await complete(client, max_tokens=20, max_completion_tokens=3, temperature=0)
    assert c["usage"]["completion_tokens"] == 3


async def test_seed_makes_sampling_repeatable(client):
    texts = [(await complete(client, max_tokens=16, temperature=1.5, top_p=1, seed=s))["choices"][0]["message"]
             ["content"] for s in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_penalties_change_the_output(client):
    plain = (await complete(client, max_tokens=40, temperature=0))["choices"][0]["message"]["content"]
    pen = (await complete(client, max_tokens=40, temperature=0, presence_penalty=2.0,
                          frequency_penalty=2.0))["choices"][0]["message"]["content"]
    assert plain != pen


async def test_stop_string_and_list(client):
    full = (await complete(client, max_tokens=30, temperature=0))["choices"][0]["message"]["content"]
    cut = full[6:9]
    idx = full.index(cut)
    for stop in (cut, [cut, "never-appears-in-output"]):
        body = await complete(client, max_tokens=30, temperature=0, stop=stop)
        assert body["choices"][0]["message"]["content"] == full[:idx]
        assert body["choices"][0]["finish_reason"] == "stop"


async def test_stream_chunks_role_finish_done(client):
    full = (await complete(client, max_tokens=10, temperature=0))["choices"][0]["message"]["content"]
    r = await post(client, max_tokens=10, temperature=0, stream=True)
    assert r.status == 200
    events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == full
    assert len(chunks) >= 3  # streamed piece by piece, not one blob


async def test_stream_include_usage(client):
    r = await post(client, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True})
    events = await sse_events(r)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert all(e["usage"] is None for e in events[:-2])


async def test_api_chat_is_the_same_contract(client):
    a = await complete(client, max_tokens=6, temperature=0)
    r = await post(client, path="/api/chat", max_tokens=6, temperature=0)
    assert r.status == 200
    b = await r.json()
    assert b["object"] == "chat.completion"
    assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]


async def test_json_schema_response_format_is_enforced(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    body = await complete(client, max_tokens=200, temperature=0,
                          response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    text = body["choices"][0]["message"]["content"]
    value = json.loads(text)
    assert set(value) == {"n", "ok"}
    assert isinstance(value["n"], int) and isinstance(value["ok"], bool)
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_json_object_response_format_constrains_output(client):
    free = (await complete(client, max_tokens=20, temperature=0))["choices"][0]["message"]["content"]
    assert not free.lstrip().startswith("{")
    text = (await complete(client, max_tokens=20, temperature=0,
                           response_format={"type": "json_object"}))["choices"][0]["message"]["content"]
    assert text.lstrip().startswith("{")


async def test_unknown_fields_are_ignored(client):
    body = await complete(client, max_tokens=3, temperature=0, user="u-1", metadata={"a": "b"},
                          parallel_tool_calls=False, some_vendor_flag=True)
    assert body["usage"]["completion_tokens"] == 3


async def test_content_parts_are_accepted(client):
    a = await complete(client, max_tokens=5, temperature=0, messages=[{"role": "user", "content": "hello"}])
    b = await complete(client, max_tokens=5, temperature=0,
                       messages=[{"role": "user", "content": [{"type": "text", "text": "hel"},
                                                              {"type": "text", "text": "lo"}]}])
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


async def test_models_health_ready(client):
    r = await client.get("/v1/models")
    body = await r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    assert body["data"][0]["object"] == "model" and body["data"][0]["owned_by"] == "local"
    assert (await client.get("/health")).status == 200
    r = await client.get("/ready")
    assert r.status == 200 and (await r.json())["models"] == {MODEL_ID: True}


async def test_ready_is_503_while_a_model_cannot_load(make_client, tiny_model, tmp_path):
    from conftest import ggufmaker, make_settings

    broken = ggufmaker.write_model(tmp_path / "broken.gguf", arch="nonesuch")
    c = await make_client(make_settings(broken, tmp_path, preload=True))
    r = await c.get("/ready")
    assert r.status == 503
    assert (await r.json())["models"] == {MODEL_ID: False}
    r = await post(c, max_tokens=3)
    assert r.status == 503
    err = (await r.json())["error"]
    assert "failed to load" in err["message"] and "Traceback" not in err["message"]
    assert (await c.get("/health")).status == 200  # the daemon itself is fine


async def test_default_threads_are_physical_cores(client):
    import psutil

    backend = client.daemon.backends[0]
    expected = psutil.cpu_count(logical=False) or psutil.cpu_count()
    assert backend.n_threads == expected
    assert backend.worker.facts["n_threads"] == expected  # what llama.cpp was really given


async def test_context_defaults_to_trained_length_capped_by_config(make_client, tiny_model, tmp_path):
    from anyad.config import parse_settings

    # The tiny model was trained for 2048 tokens.
    s = parse_settings({"defaults": {"max_context": 1024}, "models": {
        "capped": {"path": str(tiny_model)},
        "asked-too-much": {"path": str(tiny_model), "n_ctx": 8192},
        "asked-less": {"path": str(tiny_model), "n_ctx": 512}}})
    c = await make_client(s)
    ctx = {m["id"]: m["context_length"] for m in (await (await c.get("/v1/models")).json())["data"]}
    assert ctx == {"capped": 1024, "asked-too-much": 2048, "asked-less": 512}
    for b in c.daemon.backends:
        await c.daemon.scheduler.load(b.model_id)
        assert b.worker.facts["n_ctx"] == ctx[b.model_id]  # what llama.cpp really allocated


async def test_status_shows_devices_and_models(client):
    body = await (await client.get("/api/status")).json()
    dev = body["devices"]
    assert dev["ram_total_bytes"] > 0 and dev["cpu_logical"] >= 1 and isinstance(dev["gpus"], list)
    m = body["models"][MODEL_ID]
    assert m["loaded"] is True and m["pid"] == client.daemon.backends[0].worker.pid
    # On a machine with a usable GPU the tiny model goes there whole; elsewhere on the CPU.
    on_gpu = bool(client.daemon.probe.snapshot().usable_gpus)
    assert m["state"] == "loaded" and m["placement"]["kind"] == ("gpu" if on_gpu else "cpu")
    assert m["placement"]["gpu_layers"] == (3 if on_gpu else 0)  # 2 blocks and the output layer
    assert m["queue"] == {"active": 0, "waiting": 0, "parallel": 1, "max_queue": 16}
    mem = m["memory"]
    assert mem["estimated_ram_bytes"] > 0 and mem["rss_bytes"] > 0 and (mem["estimated_vram_bytes"] > 0) == on_gpu
    assert 0 < m["expires_in_s"] <= 300
