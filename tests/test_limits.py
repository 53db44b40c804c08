"""Rate limits per client and caps on one request."""

from __future__ import annotations

from anyad.config import parse_settings
from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hi"}]


def limited(tiny_model, tmp_path, **server):
    return parse_settings({"data_dir": str(tmp_path / "data"), "server": server,
                           "models": {MODEL_ID: {"path": str(tiny_model)}}})


async def test_rate_limit_per_client_with_headers_and_429(make_client, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KEY_A", "key-a-1234567890")
    monkeypatch.setenv("KEY_B", "key-b-1234567890")
    c = await make_client(limited(tiny_model, tmp_path, rate_limit_per_minute=3,
                                  api_keys=["env:KEY_A", "env:KEY_B"]))
    a = {"Authorization": "Bearer key-a-1234567890"}
    seen = []
    for _ in range(3):
        r = await c.get("/v1/models", headers=a)
        assert r.status == 200 and r.headers["X-RateLimit-Limit"] == "3"
        seen.append(int(r.headers["X-RateLimit-Remaining"]))
    assert seen == [2, 1, 0]
    r = await c.post("/v1/chat/completions", headers=a, json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.headers["X-RateLimit-Remaining"] == "0" and int(r.headers["X-RateLimit-Reset"]) > 0
    err = (await r.json())["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    # Another key has its own allowance; health checks are never limited.
    b = {"Authorization": "Bearer key-b-1234567890"}
    r = await c.post("/v1/chat/completions", headers=b, json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2,
                                                              "stream": True})
    assert r.status == 200 and r.headers["X-RateLimit-Remaining"] == "2"  # streamed replies carry them too
    await r.read()
    for _ in range(5):
        assert (await c.get("/health")).status == 200


async def test_without_keys_the_limit_is_per_address(make_client, tiny_model, tmp_path):
    c = await make_client(limited(tiny_model, tmp_path, rate_limit_per_minute=2))
    assert [(await c.get("/v1/models")).status for _ in range(3)] == [200, 200, 429]


async def test_caps_on_messages_and_prompt_length(make_client, tiny_model, tmp_path):
    c = await make_client(limited(tiny_model, tmp_path, max_messages=2, max_prompt_chars=20))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 2, "messages": MSGS * 3})
    assert r.status == 400
    err = (await r.json())["error"]
    assert err["param"] == "messages" and "at most 2" in err["message"]
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "x" * 21}]})
    assert r.status == 400 and "max_prompt_chars" in (await r.json())["error"]["message"]
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "x" * 20}]})
    assert r.status == 200
