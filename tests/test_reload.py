"""Daemon.reload in process: keys and limits swap at once; what would open the door is refused."""

from __future__ import annotations

from anyad.config import parse_settings
from conftest import MODEL_ID

BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def settings(tiny_model, tmp_path, **server):
    return parse_settings({"data_dir": str(tmp_path / "data"), "server": server,
                           "models": {MODEL_ID: {"path": str(tiny_model)}}})


async def test_a_reload_rotates_the_api_keys(make_client, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("OLD_KEY", "old-key-1")
    monkeypatch.setenv("NEW_KEY", "new-key-2")
    c = await make_client(settings(tiny_model, tmp_path, api_keys=["env:OLD_KEY"]))

    async def status(key: str) -> int:
        return (await c.post("/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"})).status

    assert await status("old-key-1") == 200 and await status("new-key-2") == 401
    c.daemon.reload(settings(tiny_model, tmp_path, api_keys=["env:NEW_KEY"]))
    assert await status("old-key-1") == 401 and await status("new-key-2") == 200


async def test_a_reload_that_would_open_a_public_listener_is_refused(make_client, tiny_model, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("KEY", "k-3")
    c = await make_client(settings(tiny_model, tmp_path, host="0.0.0.0", api_keys=["env:KEY"]))
    ok = await c.daemon.reload_from(lambda: settings(tiny_model, tmp_path, host="0.0.0.0"))
    assert not ok
    assert (await c.post("/v1/chat/completions", json=BODY)).status == 401  # keys still required
    # A secret that cannot be resolved is refused too, and the old keys stay.
    ok = await c.daemon.reload_from(lambda: settings(tiny_model, tmp_path, host="0.0.0.0",
                                                     api_keys=["env:NOT_SET_ANYWHERE"]))
    assert not ok
    r = await c.post("/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer k-3"})
    assert r.status == 200


async def test_a_reload_turns_the_rate_limit_on_and_off(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path))
    assert "X-RateLimit-Limit" not in (await c.get("/v1/models")).headers
    restart = c.daemon.reload(settings(tiny_model, tmp_path, rate_limit_per_minute=2, port=9999))
    assert restart == ["server.port"]  # said, not applied
    statuses = [(await c.get("/v1/models")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    c.daemon.reload(settings(tiny_model, tmp_path))
    assert (await c.get("/v1/models")).status == 200
