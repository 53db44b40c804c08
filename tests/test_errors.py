"""Bad input gets OpenAI's error shape with the right status, never a traceback or HTML."""

from __future__ import annotations

import pytest

from conftest import MODEL_ID, make_settings

OK_MSGS = [{"role": "user", "content": "hi"}]


def assert_error_shape(body: dict, status: int, resp_status: int) -> dict:
    assert resp_status == status
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    return err


async def error_of(resp, status: int) -> dict:
    assert resp.headers["Content-Type"].startswith("application/json"), await resp.text()
    return assert_error_shape(await resp.json(), status, resp.status)


async def test_malformed_json(client):
    r = await client.post("/v1/chat/completions", data=b'{"model": "tiny", "messages": [',
                          headers={"Content-Type": "application/json"})
    err = await error_of(r, 400)
    assert err["type"] == "invalid_request_error"
    assert "JSON" in err["message"]


async def test_body_not_an_object(client):
    r = await client.post("/v1/chat/completions", json=["not", "an", "object"])
    await error_of(r, 400)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL_ID}, "messages"),
    ({"model": MODEL_ID, "messages": []}, "messages"),
    ({"messages": OK_MSGS}, "model"),
    ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "temperature": 9}, "temperature"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "top_p": -1}, "top_p"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "stop": 3}, "stop"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "response_format": {"type": "yaml"}}, "response_format.type"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ({"model": MODEL_ID, "messages": OK_MSGS, "n": 0}, "n"),
])
async def test_schema_violation_names_the_field(client, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    err = await error_of(r, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


async def test_n_above_the_limit_says_it(client):
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": OK_MSGS, "n": 17})
    err = await error_of(r, 400)
    assert err["param"] == "n" and "16" in err["message"]


async def test_unknown_model_is_404(client):
    for stream in (False, True):
        r = await client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": OK_MSGS, "stream": stream})
        err = await error_of(r, 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "gpt-9" in err["message"] and MODEL_ID in err["message"]


async def test_prompt_longer_than_context(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, n_ctx=256))
    long = [{"role": "user", "content": "word " * 200}]
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": long, "stream": stream})
        err = await error_of(r, 400)
        assert err["code"] == "context_length_exceeded"
        assert "256" in err["message"]
    # The model is still fine for a prompt that fits.
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": OK_MSGS, "max_tokens": 2})
    assert r.status == 200


async def test_max_tokens_past_the_context_is_capped_not_failed(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, n_ctx=256))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": OK_MSGS, "max_tokens": 4096,
                                                   "temperature": 0})
    body = await r.json()
    assert r.status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] <= 256


async def test_body_over_limit_is_413(make_client, tiny_model, tmp_path):
    from anyad.config import parse_settings

    s = parse_settings({"server": {"max_body_bytes": 2048}, "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "user",
                                                                                    "content": "x" * 5000}]})
    err = await error_of(r, 413)
    assert "2048" in err["message"]


async def test_unknown_path_and_wrong_method(client):
    err = await error_of(await client.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in err["message"]
    r = await client.get("/v1/chat/completions")
    err = await error_of(r, 405)
    assert "POST" in err["message"] and r.headers["Allow"] == "POST"
    await error_of(await client.post("/health"), 405)


async def test_bad_schema_for_grammar_is_400(client):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": OK_MSGS,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    err = await error_of(r, 400)
    assert err["param"] == "response_format"


async def test_errors_leave_the_daemon_serving(client):
    await client.post("/v1/chat/completions", data=b"\xff\xfe garbage")
    await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": "nope"})
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": OK_MSGS, "max_tokens": 2})
    assert r.status == 200
