"""The redaction plugin: what reaches a (fake) remote provider, and what local models see."""

from __future__ import annotations

import asyncio

from anyad.config import parse_settings
from anyad.plugins import redact
from conftest import MODEL_ID

EMAIL, CARD, KEY = "ann.lee@example.org", "4111 1111 1111 1111", "sk-proj-Abc123Def456Ghi789Jkl0"
NOT_A_CARD = "1234 5678 9012 3457"
TEXT = (f"Mail {EMAIL} about card {CARD} (order {NOT_A_CARD}); use key {KEY}. "
        f"Cc {EMAIL} and badge EMP-123456.")


def settings(tiny_model, tmp_path, url, enabled=("redact",), **redact_cfg):
    return parse_settings({"data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
                           "models": {MODEL_ID: {"path": str(tiny_model)}},
                           "providers": {"up": {"base_url": url, "max_retries": 0}},
                           "routes": [{"name": "careful", "targets": ["up/gpt", MODEL_ID]}],
                           "router": {"backoff_base_s": 0.01},
                           "plugins": {"enabled": list(enabled), "redact": redact_cfg}})


async def ask(c, model, content, **kw):
    r = await c.post("/v1/chat/completions", json={"model": model, "max_tokens": 4, "temperature": 0,
                                                   "messages": [{"role": "system", "content": "Be kind."},
                                                                {"role": "user", "content": content}], **kw})
    return r, await r.json()


async def test_what_leaves_the_machine_is_masked(make_client, tiny_model, tmp_path, start_fake):
    assert redact._luhn(CARD.replace(" ", "")) and not redact._luhn(NOT_A_CARD.replace(" ", ""))
    fake, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url, patterns={"employee": r"EMP-\d{6}"}))
    r, _ = await ask(c, "up/gpt", TEXT)
    assert r.status == 200
    sent = fake.requests[-1]["messages"][1]["content"]
    assert sent == ("Mail [EMAIL_1] about card [CARD_1] (order 1234 5678 9012 3457); use key [API_KEY_1]. "
                    "Cc [EMAIL_1] and badge [EMPLOYEE_1].")
    assert fake.requests[-1]["messages"][0]["content"] == "Be kind."
    # Content parts too.
    r, _ = await ask(c, "up/gpt", [{"type": "text", "text": f"write to {EMAIL}"}])
    assert fake.requests[-1]["messages"][1]["content"] == [{"type": "text", "text": "write to [EMAIL_1]"}]
    # The history keeps what the client sent.
    await asyncio.to_thread(c.daemon.store.flush)
    page = await (await c.get("/api/conversations?q=ann.lee")).json()
    assert page["total"] == 2  # both requests, as sent


async def test_local_models_see_the_original(make_client, tiny_model, tmp_path, start_fake):
    fake, url = await start_fake("500")
    c = await make_client(settings(tiny_model, tmp_path, url))
    r, via_route = await ask(c, "careful", TEXT)
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == MODEL_ID
    assert EMAIL not in str(fake.requests) and "[EMAIL_1]" in str(fake.requests)  # the remote try was masked
    _, direct = await ask(c, MODEL_ID, TEXT)
    masked, _ = redact.Redactor(redact.RedactSettings()).messages([{"role": "user", "content": TEXT}])
    _, direct_masked = await ask(c, MODEL_ID, masked[0]["content"])
    # The local model read the original: the same prompt as asked directly, not the masked one.
    assert via_route["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert via_route["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert direct_masked["usage"]["prompt_tokens"] != direct["usage"]["prompt_tokens"]


async def test_without_the_plugin_nothing_is_masked_and_bad_patterns_are_refused(make_client, tiny_model,
                                                                                  tmp_path, start_fake):
    fake, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url, enabled=()))
    await ask(c, "up/gpt", TEXT)
    assert fake.requests[-1]["messages"][1]["content"] == TEXT
    from anyad.errors import ConfigError
    import pytest

    with pytest.raises(ConfigError, match="plugins.redact"):
        await make_client(settings(tiny_model, tmp_path / "b", url, patterns={"broken": "(unclosed"}))
