"""Remote providers, routes, fallback, circuit breakers and offline mode, against real
aiohttp servers on 127.0.0.1 (healthy, failing, rate-limiting, hanging, dropping)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from anyad.config import parse_settings
from conftest import MODEL_ID, free_port
from fakes import REPLY, Blackhole, FakeOpenAI

MSGS = [{"role": "user", "content": "hello"}]


def gateway_settings(tiny_model, providers: dict, routes: list | None = None, **router):
    return parse_settings({
        "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {name: {"first_byte_timeout_s": 1.0, "max_retries": 0, **p} for name, p in providers.items()},
        "routes": routes or [],
        "router": {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, **router},
    })


async def post(client, model, **kw):
    return await client.post("/v1/chat/completions", json={"model": model, "messages": MSGS, **kw})


async def sse(resp) -> tuple[list, str]:
    raw = (await resp.read()).decode()
    events = [l[6:] for l in raw.split("\n") if l.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events], raw


def text_of(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


async def test_remote_non_stream_relays_and_passes_unknown_fields(make_client, tiny_model, start_fake, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test-secret-123")
    fake, url = await start_fake()
    c = await make_client(gateway_settings(tiny_model, {"fake": {"base_url": url, "api_key": "env:FAKE_KEY",
                                                                 "headers": {"X-Org": "acme"}}}))
    r = await post(c, "fake/gpt-x", user="u1", logprobs=False, metadata={"k": "v"}, temperature=0.3)
    assert r.status == 200
    assert r.headers["X-Anyad-Backend"] == "fake/gpt-x"
    body = await r.json()
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    sent = fake.requests[-1]
    assert sent["model"] == "gpt-x"
    assert sent["user"] == "u1" and sent["logprobs"] is False and sent["metadata"] == {"k": "v"}
    assert sent["temperature"] == 0.3 and sent["messages"] == MSGS
    assert fake.headers[-1]["Authorization"] == "Bearer sk-test-secret-123"
    assert fake.headers[-1]["X-Org"] == "acme"


async def test_remote_stream_tolerates_upstream_quirks(make_client, tiny_model, start_fake):
    fake, url = await start_fake()
    c = await make_client(gateway_settings(tiny_model, {"fake": {"base_url": url}}))
    r = await post(c, "fake/gpt-x", stream=True, stream_options={"include_usage": True})
    assert r.status == 200
    events, raw = await sse(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert text_of(events) == REPLY
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]
            and e["choices"][0]["finish_reason"]] == ["stop"]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 7
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}


async def test_tool_calls_come_back_intact(make_client, tiny_model, start_fake):
    fake, url = await start_fake()
    c = await make_client(gateway_settings(tiny_model, {"fake": {"base_url": url}}))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = await sdk.chat.completions.create(model="fake/gpt-x", messages=MSGS, tools=tools, tool_choice="auto")
    (call,) = r.choices[0].message.tool_calls
    assert call.id == "call_1" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert fake.requests[-1]["tools"] == tools and fake.requests[-1]["tool_choice"] == "auto"

    stream = await sdk.chat.completions.create(model="fake/gpt-x", messages=MSGS, tools=tools, stream=True)
    name, args, finish = "", "", None
    async for chunk in stream:
        d = chunk.choices[0].delta if chunk.choices else None
        for tc in (d.tool_calls or []) if d else []:
            name += tc.function.name or ""
            args += tc.function.arguments or ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert name == "get_weather" and json.loads(args) == {"city": "Oslo"} and finish == "tool_calls"
    await sdk.close()


async def test_openai_sdk_through_a_remote_route(make_client, tiny_model, start_fake):
    _, url = await start_fake()
    c = await make_client(gateway_settings(tiny_model, {"fake": {"base_url": url, "models": ["gpt-x"]}},
                                           [{"name": "chat", "targets": ["fake/gpt-x", MODEL_ID]}]))
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    r = await sdk.chat.completions.create(model="chat", messages=MSGS)
    assert r.choices[0].message.content == REPLY
    text = ""
    async for chunk in await sdk.chat.completions.create(model="chat", messages=MSGS, stream=True):
        text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == REPLY
    ids = [m.id for m in (await sdk.models.list()).data]
    assert ids == [MODEL_ID, "fake/gpt-x", "chat"]
    await sdk.close()


@pytest.mark.parametrize("mode", ["closed", "500", "html502", "429", "hang"])
@pytest.mark.parametrize("stream", [False, True])
async def test_fallback_to_the_local_model(make_client, tiny_model, start_fake, mode, stream):
    if mode == "closed":
        url, fake = f"http://127.0.0.1:{free_port()}/v1", None
    else:
        fake, url = await start_fake(mode)
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}]))
    r = await post(c, "chat", max_tokens=4, stream=stream)
    assert r.status == 200, await r.text()
    assert r.headers["X-Anyad-Backend"] == MODEL_ID
    note = r.headers["X-Anyad-Fallback"]
    assert note.startswith("up/big: ")
    expected = {"closed": "cannot connect", "500": "upstream exploded", "html502": "502 Bad Gateway",
                "429": "slow down", "hang": "sent nothing within 1 s"}[mode]
    assert expected in note, note
    assert "<" not in note
    if stream:
        events, _ = await sse(r)
        assert events[-1] == "[DONE]" and text_of(events)
    else:
        assert (await r.json())["usage"]["completion_tokens"] == 4


async def test_client_errors_do_not_fall_back(make_client, tiny_model, start_fake):
    fake, url = await start_fake("400")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}]))
    for stream in (False, True):
        r = await post(c, "chat", stream=stream)
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["message"] == "up: messages[0].content is too spicy"
        assert err["code"] == "spicy" and err["param"] == "messages"
        assert "X-Anyad-Backend" not in r.headers
    assert len(fake.requests) == 2


async def test_upstream_error_reaches_the_client_with_its_status(make_client, tiny_model, start_fake):
    _, url = await start_fake("429", retry_after=3)
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}}))
    r = await post(c, "up/big")
    assert r.status == 429
    assert r.headers["Retry-After"] == "3"
    assert (await r.json())["error"]["message"] == "up: slow down"


async def test_retries_with_backoff_on_the_same_target(make_client, tiny_model, start_fake):
    fake, url = await start_fake("500")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url, "max_retries": 2}},
                                           breaker_failures=10))
    r = await post(c, "up/big")
    assert r.status == 500
    assert len(fake.requests) == 3  # one try and two retries


async def test_failure_mid_stream_is_in_band_and_never_switches(make_client, tiny_model, start_fake):
    fake, url = await start_fake("reset")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}]))
    r = await post(c, "chat", stream=True)
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == "up/big"
    events, raw = await sse(r)
    assert "[DONE]" not in events
    assert text_of(events[:-1]) == "Hello from"
    assert events[-1]["error"]["code"] == "backend_error" and "mid-reply" in events[-1]["error"]["message"]
    sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        async for _ in await sdk.chat.completions.create(model="chat", messages=MSGS, stream=True):
            pass
    await sdk.close()


async def test_circuit_breaker_opens_probes_and_closes(make_client, tiny_model, start_fake):
    fake, url = await start_fake("500")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}],
                                           breaker_failures=2, breaker_cooldown_s=0.5))
    now = [1000.0]
    c.daemon.router.clock = lambda: now[0]  # time passes only when the test says so
    for _ in range(2):
        r = await post(c, "chat", max_tokens=2)
        assert r.headers["X-Anyad-Backend"] == MODEL_ID
    status = await (await c.get("/api/status")).json()
    assert status["breakers"]["up/big"]["state"] == "open"
    # Open: skipped without a request to the provider.
    r = await post(c, "chat", max_tokens=2)
    assert r.headers["X-Anyad-Fallback"] == "up/big: circuit open"
    assert len(fake.requests) == 2
    # After the cooldown one probe goes through; the provider has recovered.
    fake.mode = "ok"
    now[0] += 0.6
    r = await post(c, "chat")
    assert r.headers["X-Anyad-Backend"] == "up/big"
    status = await (await c.get("/api/status")).json()
    assert status["breakers"]["up/big"]["state"] == "closed"


async def test_half_open_probe_failure_reopens(make_client, tiny_model, start_fake):
    fake, url = await start_fake("500")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}],
                                           breaker_failures=1, breaker_cooldown_s=0.3))
    now = [1000.0]
    c.daemon.router.clock = lambda: now[0]
    await post(c, "chat", max_tokens=1)
    now[0] += 0.35
    r = await post(c, "chat", max_tokens=1)  # the probe, which fails
    assert r.headers["X-Anyad-Fallback"].startswith("up/big: 500")
    status = await (await c.get("/api/status")).json()
    assert status["breakers"]["up/big"]["state"] == "open"


async def test_models_lists_providers_and_routes(make_client, tiny_model, start_fake):
    _, url = await start_fake()
    c = await make_client(gateway_settings(tiny_model, {"fake": {"base_url": url, "models": ["a", "b"]}},
                                           [{"name": "chat", "targets": ["fake/a", MODEL_ID]}]))
    data = (await (await c.get("/v1/models")).json())["data"]
    assert [(m["id"], m["owned_by"]) for m in data] == [(MODEL_ID, "local"), ("fake/a", "fake"), ("fake/b", "fake"),
                                                        ("chat", "anyad-route")]
    r = await post(c, "fake/unlisted-model-is-fine")
    assert r.status == 200
    r = await post(c, "nope/x")
    assert r.status == 404


async def test_route_to_unknown_target_is_a_config_error(tiny_model):
    from anyad.daemon import Daemon
    from anyad.errors import ConfigError

    with pytest.raises(ConfigError, match=r"routes\[0\]\.targets\[1\]: 'ghost'"):
        Daemon(gateway_settings(tiny_model, {}, [{"name": "chat", "targets": [MODEL_ID, "ghost"]}]))


@pytest.fixture
def blackhole():
    b = Blackhole()
    yield b
    b.lift()


async def test_offline_after_connect_timeouts_then_no_more_waiting(make_client, tiny_model, blackhole):
    url = f"http://127.0.0.1:{blackhole.port}/v1"
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url, "connect_timeout_s": 0.3}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}],
                                           offline_probe_interval_s=60))
    r = await post(c, "chat", max_tokens=2)
    assert r.headers["X-Anyad-Backend"] == MODEL_ID
    assert "connecting timed out" in r.headers["X-Anyad-Fallback"]
    # Now offline: the remote target is skipped without another connect attempt (and its timeout).
    for stream in (False, True):
        r = await post(c, "chat", max_tokens=2, stream=stream)
        assert r.status == 200 and r.headers["X-Anyad-Fallback"] == "up/big: offline"
    # A direct request for the remote model says so clearly instead of hanging.
    r = await post(c, "up/big")
    assert r.status == 503 and "offline" in (await r.json())["error"]["message"]


async def test_offline_mode_skips_remotes_until_the_network_is_back(make_client, tiny_model, aiohttp_server,
                                                                   blackhole):
    url = f"http://127.0.0.1:{blackhole.port}/v1"
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url, "connect_timeout_s": 0.3}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}],
                                           offline_probe_interval_s=0.1, breaker_failures=100))
    r = await post(c, "chat", max_tokens=2)
    assert r.headers["X-Anyad-Backend"] == MODEL_ID and "connecting timed out" in r.headers["X-Anyad-Fallback"]
    status = await (await c.get("/api/status")).json()
    assert status["offline"]["offline"] is True
    # Offline: the remote is not even tried.
    r = await post(c, "chat", max_tokens=2)
    assert r.headers["X-Anyad-Backend"] == MODEL_ID and r.headers["X-Anyad-Fallback"] == "up/big: offline"
    # The network comes back (the host answers again, the provider listens); the probe notices.
    blackhole.lift()
    fake = FakeOpenAI()
    await aiohttp_server(fake.app(), port=blackhole.port)
    for _ in range(600):
        if not (await (await c.get("/api/status")).json())["offline"]["offline"]:
            break
        await asyncio.sleep(0.05)
    r = await post(c, "chat")
    assert r.headers["X-Anyad-Backend"] == "up/big"
    assert fake.requests


async def test_provider_key_never_reaches_logs_or_status(make_client, tiny_model, start_fake, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    secret = "sk-super-secret-value-42"
    monkeypatch.setenv("UP_KEY", secret)
    fake, url = await start_fake("500")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url, "api_key": "env:UP_KEY"}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}]))
    await post(c, "chat", max_tokens=2)
    fake.mode = "ok"
    await post(c, "up/big", stream=True)
    status = await (await c.get("/api/status")).text()
    models = await (await c.get("/v1/models")).text()
    assert fake.headers[-1]["Authorization"] == f"Bearer {secret}"  # it was used…
    for text in (caplog.text, status, models):  # …and shown nowhere
        assert secret not in text


async def test_mid_stream_failure_counts_against_the_breaker(make_client, tiny_model, start_fake):
    fake, url = await start_fake("reset")
    c = await make_client(gateway_settings(tiny_model, {"up": {"base_url": url}},
                                           [{"name": "chat", "targets": ["up/big", MODEL_ID]}],
                                           breaker_failures=1, breaker_cooldown_s=60))
    r = await post(c, "chat", stream=True)
    events, _ = await sse(r)
    assert "error" in events[-1]
    status = await (await c.get("/api/status")).json()
    assert status["breakers"]["up/big"]["state"] == "open"
    r = await post(c, "chat", max_tokens=2)
    assert r.headers["X-Anyad-Backend"] == MODEL_ID and r.headers["X-Anyad-Fallback"] == "up/big: circuit open"
