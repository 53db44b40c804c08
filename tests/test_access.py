"""API keys, the refusal to listen beyond loopback without them, and CORS."""

from __future__ import annotations

import logging
import subprocess

import openai
import pytest

from anyad.config import parse_settings
from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, wait_http

KEY = "anyad-client-key-7Hq2Vx9LpR4m"
MSGS = [{"role": "user", "content": "hi"}]


def keyed(tiny_model, tmp_path, **server):
    return parse_settings({"data_dir": str(tmp_path / "data"), "server": {"api_keys": ["env:ANYAD_TEST_KEY"], **server},
                           "models": {MODEL_ID: {"path": str(tiny_model)}}})


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("ANYAD_TEST_KEY", KEY)


async def test_api_keys_are_required_and_checked(make_client, tiny_model, tmp_path, key_env, caplog):
    caplog.set_level(logging.DEBUG)
    c = await make_client(keyed(tiny_model, tmp_path))
    body = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 2}
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    err = (await r.json())["error"]
    assert err["code"] == "invalid_api_key" and "Authorization: Bearer" in err["message"]
    for bad in ("Bearer nope", "Basic " + KEY, "Bearer", KEY):
        r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": bad})
        assert r.status == 401 and (await r.json())["error"]["type"] == "invalid_request_error"
    for path in ("/v1/models", "/api/status", "/api/conversations"):
        assert (await c.get(path)).status == 401
    r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status == 200
    assert (await c.get("/health")).status == 200 and (await c.get("/ready")).status == 200
    assert KEY not in caplog.text


async def test_the_official_client_passes_its_key(make_client, tiny_model, tmp_path, key_env):
    c = await make_client(keyed(tiny_model, tmp_path))
    base = str(c.make_url("/v1"))
    good = openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)
    reply = await good.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2)
    assert reply.usage.completion_tokens == 2
    bad = openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2)


def test_a_literal_key_in_the_config_is_refused(tiny_model, tmp_path):
    from anyad.errors import ConfigError

    with pytest.raises(ConfigError, match="literal key is refused"):
        parse_settings({"server": {"api_keys": [KEY]}})


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_listening_beyond_loopback_needs_keys(tiny_model, tmp_path, host):
    p = subprocess.run(anyad_cmd("serve", "--model", str(tiny_model), "--host", host, "--port", str(free_port())),
                       env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "refusing to listen on" in p.stderr and "api_keys" in p.stderr
    assert "Traceback" not in p.stderr


def test_with_keys_it_listens_on_all_addresses(tiny_model, tmp_path):
    port = free_port()
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\napi_keys = ["env:ANYAD_TEST_KEY"]\n'
                   f'[models.{MODEL_ID}]\npath = "{tiny_model}"\n')
    env = clean_env(tmp_path)
    env["ANYAD_TEST_KEY"] = KEY
    proc = subprocess.Popen(anyad_cmd("serve", "--config", str(cfg)), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and KEY not in err


async def test_cors_only_for_allowed_origins(make_client, tiny_model, tmp_path):
    s = parse_settings({"data_dir": str(tmp_path / "data"), "server": {"allowed_origins": ["http://localhost:3000"]},
                        "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    pre = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type,authorization"}
    r = await c.options("/v1/chat/completions", headers=pre)
    assert r.status == 204 and "POST" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert r.headers["Access-Control-Allow-Headers"] == "content-type,authorization"
    r = await c.options("/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert (await r.json())["error"]["code"] == "origin_not_allowed"
    # Replies, streamed ones too, carry the header for an allowed origin only.
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", headers={"Origin": "http://localhost:3000"},
                         json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2, "stream": stream})
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "X-Anyad-Backend" in r.headers["Access-Control-Expose-Headers"]
        await r.read()
    # Any other origin is refused outright, not only in preflights.
    r = await c.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers


async def test_no_cors_headers_unless_configured(client):
    r = await client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await client.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                              "Access-Control-Request-Method": "POST"})
    assert r.status == 403
