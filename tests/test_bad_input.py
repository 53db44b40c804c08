"""Bad input gets a 4xx naming the field, through every door it can come in by; never a
5xx, never a damaged worker; and a provider's empty reply is a failed target, not an
empty answer."""

from __future__ import annotations

import json

import pytest
from aiohttp import ClientSession, web

import ggufmaker
from anyad.config import parse_settings
from anyad.errors import InvalidRequest
from anyad.plugins import ollama as ollama_plugin
from conftest import MODEL_ID
from test_errors import error_of

OK = [{"role": "user", "content": "hi"}]
N_VOCAB = len(ggufmaker.vocabulary(ggufmaker.TINY)[0])
CHAT_DOORS = ("/v1/chat/completions", "/api/chat")


@pytest.fixture
async def doors(make_client, tiny_model, tmp_path, start_fake):
    """The daemon with the Ollama listener: (main test client, an HTTP session on the Ollama door, its URL)."""
    _, url = await start_fake()
    s = parse_settings({"data_dir": str(tmp_path / "data"),
                        "models": {MODEL_ID: {"path": str(tiny_model), "n_ctx": 256}},
                        "providers": {"up": {"base_url": url, "models": ["gpt-x"]}},
                        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}})
    c = await make_client(s)
    host, port = ollama_plugin.address(c.daemon)
    async with ClientSession(f"http://{host}:{port}") as ollama:
        c.ollama = ollama
        yield c


async def ollama_error(resp, status: int = 400) -> str:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


async def chat_works(c, path: str = "/v1/chat/completions") -> None:
    r = await c.post(path, json={"model": MODEL_ID, "messages": OK, "max_tokens": 2})
    assert r.status == 200, await r.text()


# -- messages and types OpenAI refuses ------------------------------------------------------

@pytest.mark.parametrize("path", CHAT_DOORS)
@pytest.mark.parametrize("change, param", [
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": None}, *OK]}, "messages[0].content"),
    ({"messages": [*OK, {"role": "tool", "tool_call_id": "c1"}]}, "messages[1].content"),
    ({"messages": [*OK, {"role": "assistant", "content": None}]}, "messages[1].content"),
    ({"messages": [*OK, {"role": "assistant", "tool_calls": "get_weather"}]}, "messages[1].tool_calls"),
    ({"messages": [*OK, {"role": "assistant", "tool_calls": [None]}]}, "messages[1].tool_calls[0]"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"temperature": "1"}, "temperature"),
    ({"seed": "7"}, "seed"),
    ({"seed": 2**70}, "seed"),  # past what llama.cpp takes: a 400, not a 502 from the worker
    ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "up"}}, "logit_bias"),
])
async def test_refused_like_openai_with_the_field_named(doors, path, change, param):
    r = await doors.post(path, json={"model": MODEL_ID, "messages": OK, **change})
    err = await error_of(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    await chat_works(doors, path)


async def test_what_openai_accepts_still_passes(doors):
    tool_call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    for messages in ([{"role": "user", "content": ""}],
                     [*OK, {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                      {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]):
        r = await doors.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": messages,
                                                           "max_tokens": 2, "temperature": 1, "stream": False})
        assert r.status == 200, await r.text()


# -- logit_bias against the vocabulary ------------------------------------------------------

@pytest.mark.parametrize("path", CHAT_DOORS)
@pytest.mark.parametrize("stream", [False, True])
async def test_logit_bias_outside_the_vocabulary_is_400_before_generation(doors, path, stream, capfd):
    r = await doors.post(path, json={"model": MODEL_ID, "messages": OK, "max_tokens": 8, "stream": stream,
                                     "logit_bias": {"1": 5, str(N_VOCAB): 5}})
    err = await error_of(r, 400)
    assert err["param"] == "logit_bias" and str(N_VOCAB) in err["message"]
    # The last token of the vocabulary is one; the worker took it and says nothing per token.
    r = await doors.post(path, json={"model": MODEL_ID, "messages": OK, "max_tokens": 8, "temperature": 0,
                                     "logit_bias": {str(N_VOCAB - 1): 100}})
    assert r.status == 200, await r.text()
    assert "Traceback" not in capfd.readouterr().err


# -- embeddings: empty inputs, on every door -----------------------------------------------

@pytest.mark.parametrize("value", ["", [], [""], ["ok", ""]])
async def test_empty_embedding_input_is_400_on_every_door(doors, value):
    err = await error_of(await doors.post("/v1/embeddings", json={"model": MODEL_ID, "input": value}), 400)
    assert err["param"] == "input" and "empty" in err["message"]
    assert "empty" in await ollama_error(await doors.ollama.post("/api/embed", json={"model": MODEL_ID,
                                                                                      "input": value}))
    if isinstance(value, str):
        assert "prompt" in await ollama_error(await doors.ollama.post("/api/embeddings", json={
            "model": MODEL_ID, "prompt": value}))
    r = await doors.ollama.post("/api/embed", json={"model": MODEL_ID, "input": "still fine"})
    assert r.status == 200 and len((await r.json())["embeddings"][0]) == 64


async def test_ollama_embeddings_prompt_must_be_a_string(doors):
    for prompt in (5, None, ["a"]):
        assert "prompt" in await ollama_error(await doors.ollama.post("/api/embeddings", json={
            "model": MODEL_ID, "prompt": prompt}))


async def test_worker_refuses_an_input_with_no_tokens_and_unloads_cleanly(doors):
    """Past the doors' check (a backend called directly), the worker itself refuses an input
    that tokenizes to nothing, rather than let llama.cpp damage its context."""
    backend = doors.daemon.local[MODEL_ID]
    with pytest.raises(InvalidRequest) as exc:
        await backend.embed([""], MODEL_ID)
    assert exc.value.param == "input"
    pid = backend.pid
    await doors.daemon.scheduler.unload(MODEL_ID)
    assert not backend.loaded
    r = await doors.ollama.post("/api/embed", json={"model": MODEL_ID, "input": ["a", "b"]})
    assert r.status == 200 and len((await r.json())["embeddings"]) == 2
    assert backend.pid != pid  # a fresh worker: the first one ended when unloaded


# -- Ollama's tool calls --------------------------------------------------------------------

@pytest.mark.parametrize("tool_calls", ["get_weather", [None], [{"function": None}], [{"function": "f"}], [5]])
async def test_ollama_malformed_tool_calls_are_400(doors, tool_calls):
    messages = [*OK, {"role": "assistant", "content": "", "tool_calls": tool_calls}]
    r = await doors.ollama.post("/api/chat", json={"model": MODEL_ID, "messages": messages, "stream": False})
    assert "tool_calls" in await ollama_error(r)
    r = await doors.ollama.post("/api/chat", json={"model": MODEL_ID, "messages": OK, "stream": False,
                                                   "options": {"num_predict": 2}})
    assert r.status == 200


async def test_ollama_tool_call_without_a_name_names_it(doors):
    messages = [*OK, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]
    r = await doors.ollama.post("/api/chat", json={"model": MODEL_ID, "messages": messages, "stream": False})
    assert "messages[1].tool_calls[0].function.name" in await ollama_error(r)


async def test_ollama_messages_may_leave_content_out(doors):
    """Ollama reads a message without content as an empty one (an assistant's tool call)."""
    messages = [*OK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
                {"role": "tool", "content": "done", "tool_name": "f"}, {"role": "user"}]
    r = await doors.ollama.post("/api/chat", json={"model": MODEL_ID, "messages": messages, "stream": False,
                                                   "options": {"num_predict": 2}})
    assert r.status == 200, await r.text()


# -- providers that answer 200 with no choices ----------------------------------------------

class EmptyProvider:
    """An OpenAI-compatible upstream whose 200 replies hold no choice."""

    def __init__(self, reply: dict) -> None:
        self.reply = reply
        self.calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        if not (await request.json()).get("stream"):
            return web.json_response(self.reply)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}}
        await resp.write(b"data: " + json.dumps(self.reply).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return resp


@pytest.mark.parametrize("reply", [{}, {"choices": []}, {"choices": None, "usage": {"prompt_tokens": 1}}])
async def test_a_reply_with_no_choices_is_502_and_falls_back(make_client, tiny_model, tmp_path, aiohttp_server,
                                                             start_fake, reply):
    empty = EmptyProvider(reply)
    server = await aiohttp_server(empty.app())
    _, good = await start_fake()
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {"empty": {"base_url": f"http://127.0.0.1:{server.port}/v1", "models": ["m"],
                                "max_retries": 0},
                      "good": {"base_url": good, "models": ["m"]}},
        "router": {"breaker_failures": 100},
        "routes": [{"name": "both", "targets": ["empty/m", "good/m"]}]}))
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json={"model": "empty/m", "messages": OK, "stream": stream})
        err = await error_of(r, 502)
        assert "without a choice" in err["message"] or "no choices" in err["message"]
        r = await c.post("/v1/chat/completions", json={"model": "both", "messages": OK, "stream": stream})
        assert r.status == 200 and r.headers["X-Anyad-Backend"] == "good/m"
        assert "Hello from the fake provider." in await r.text()


# -- the OpenAPI document -------------------------------------------------------------------

async def test_openapi_document_is_keyless_by_default_and_needs_a_key_when_keys_exist(
        make_client, tiny_model, tmp_path, monkeypatch):
    r = await (await make_client(parse_settings({"data_dir": str(tmp_path / "a"),
                                                 "models": {MODEL_ID: {"path": str(tiny_model)}}}))
               ).get("/openapi.json")
    doc = await r.json()
    assert r.status == 200 and doc["openapi"].startswith("3.1")
    # The request schema is the validating model's: the strict, required fields it enforces.
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and "logit_bias" in chat["properties"]
    error = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"message", "type", "param", "code"}

    monkeypatch.setenv("ALICE_KEY", "sk-alice-0123456789")
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "b"),
                                          "models": {MODEL_ID: {"path": str(tiny_model)}},
                                          "keys": {"alice": {"key": "env:ALICE_KEY"}}}))
    await error_of(await c.get("/openapi.json"), 401)
    r = await c.get("/openapi.json", headers={"Authorization": "Bearer sk-alice-0123456789"})
    assert r.status == 200 and (await r.json()) == doc
