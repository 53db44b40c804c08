"""A web page in the user's browser cannot read or drive a keyless daemon: foreign Host
names (DNS rebinding) and foreign origins (cross-site requests, simple ones included)
are refused on both listeners; loopback names, configured names and clients that send no
Origin keep working."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from anyad.config import parse_settings
from anyad.plugins import ollama as ollama_plugin
from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hello"}]
CHAT = b'{"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}'


@pytest.fixture
async def doors(make_client, tiny_model, tmp_path):
    """A keyless daemon with its Ollama listener: (test client, Ollama base URL)."""
    s = parse_settings({"data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
                        "server": {"allowed_hosts": ["anyad.lan"], "allowed_origins": ["http://localhost:3000"]},
                        "models": {MODEL_ID: {"path": str(tiny_model)}},
                        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}})
    c = await make_client(s)
    await c.daemon.scheduler.load(MODEL_ID)
    host, port = ollama_plugin.address(c.daemon)
    async with aiohttp.ClientSession() as session:
        c.ollama = f"http://{host}:{port}"
        c.http = session
        yield c


async def _history_total(c) -> int:
    await asyncio.to_thread(c.daemon.store.flush)
    return (await (await c.get("/api/conversations")).json())["total"]


READS = [("GET", "/api/conversations"), ("GET", "/api/status"), ("GET", "/api/usage"), ("GET", "/metrics"),
         ("GET", "/v1/models"), ("GET", "/"), ("GET", "/health")]
OLLAMA_READS = ["/api/tags", "/api/ps", "/api/version", "/"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:2692", "192.168.1.20:2692",
                                  "localhost.attacker.example", "127.0.0.1.nip.io"])
async def test_a_rebinding_host_is_refused_on_both_listeners(doors, host):
    c = doors
    for method, path in READS:
        r = await c.request(method, path, headers={"Host": host})
        assert r.status == 403, path
        body = await r.json()
        assert body["error"]["code"] == "host_not_allowed" and "allowed_hosts" in body["error"]["message"]
    r = await c.post("/v1/chat/completions", data=CHAT, headers={"Host": host, "Content-Type": "application/json"})
    assert r.status == 403
    assert await _history_total(c) == 0  # the refused chat never ran
    for path in OLLAMA_READS:
        async with c.http.get(c.ollama + path, headers={"Host": host}) as r:
            assert r.status == 403, path
            assert "error" in await r.json()  # Ollama's error shape
    async with c.http.post(c.ollama + "/api/chat", headers={"Host": host},
                              json={"model": MODEL_ID, "messages": MSGS, "stream": False,
                                    "options": {"num_predict": 2}}) as r:
        assert r.status == 403


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "127.0.0.1:{port}", "127.0.0.2", "[::1]:{port}",
                                  "LOCALHOST", "dash.localhost:{port}", "anyad.lan", "anyad.lan:{port}"])
async def test_loopback_names_and_allowed_hosts_are_answered(doors, host):
    c = doors
    host = host.format(port=c.server.port)
    for path in ("/v1/models", "/api/conversations", "/"):
        assert (await c.get(path, headers={"Host": host})).status == 200, path
    async with c.http.get(c.ollama + "/api/tags", headers={"Host": host}) as r:
        assert r.status == 200


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:8080", "file://"])
async def test_a_foreign_origin_is_refused_whatever_the_method_and_content_type(doors, origin):
    c = doors
    o = {"Origin": origin}
    # Simple requests (no preflight): text/plain, form-urlencoded, multipart.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = await c.post("/v1/chat/completions", data=CHAT, headers={**o, "Content-Type": ctype})
        assert r.status == 403 and (await r.json())["error"]["code"] == "origin_not_allowed"
        assert "Access-Control-Allow-Origin" not in r.headers
    for path in ("/api/models/tiny/unload", "/api/models/tiny/load", "/api/reload"):
        r = await c.post(path, data=b"", headers={**o, "Content-Type": "text/plain"})
        assert r.status == 403, path
    for method, path in READS:
        assert (await c.request(method, path, headers=o)).status == 403, path
    r = await c.options("/v1/chat/completions", headers={**o, "Access-Control-Request-Method": "POST"})
    assert r.status == 403
    assert await _history_total(c) == 0
    assert c.daemon.scheduler.models[MODEL_ID].state == "loaded"  # nothing unloaded it
    # The Ollama listener: keep_alive 0 would unload the model; reads are refused too.
    async with c.http.post(c.ollama + "/api/generate", data=b'{"model": "tiny", "keep_alive": 0}',
                              headers={**o, "Content-Type": "text/plain"}) as r:
        assert r.status == 403 and "origin" in (await r.json())["error"]
    for path in OLLAMA_READS:
        async with c.http.get(c.ollama + path, headers=o) as r:
            assert r.status == 403, path
    assert c.daemon.scheduler.models[MODEL_ID].state == "loaded"


async def test_clients_without_an_origin_and_allowed_origins_keep_working(doors):
    c = doors
    # curl -d '{…}' sends form-urlencoded, or nothing at all: no Origin, so no browser.
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = await c.post("/v1/chat/completions", data=CHAT, headers=headers, skip_auto_headers=["Content-Type"])
        assert r.status == 200, await r.text()
    r = await c.post("/v1/chat/completions", data=CHAT,
                     headers={"Origin": "http://localhost:3000", "Content-Type": "application/json"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    # The dashboard's own requests: its origin is the listener's own address.
    own = f"http://127.0.0.1:{c.server.port}"
    r = await c.post("/v1/chat/completions", data=CHAT, headers={"Origin": own, "Content-Type": "application/json"})
    assert r.status == 200
    async with c.http.get(c.ollama + "/api/tags", headers={"Origin": c.ollama}) as r:
        assert r.status == 200
    assert await _history_total(c) == 4


async def test_cross_site_subresources_are_refused_but_navigation_is_not(doors):
    c = doors
    # <img src> / <script src> from another site: no Origin, but the browser says where it came from.
    r = await c.get("/api/conversations", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert r.status == 403
    # A link to the dashboard from another page opens it.
    r = await c.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert r.status == 200


async def test_allowed_hosts_and_origins_change_on_reload(doors):
    c = doors
    assert (await c.get("/v1/models", headers={"Host": "box.lan"})).status == 403
    new = c.daemon.settings.model_copy(update={"server": c.daemon.settings.server.model_copy(
        update={"allowed_hosts": ["box.lan"], "allowed_origins": ["https://app.example"]})})
    c.daemon.reload(new)
    assert (await c.get("/v1/models", headers={"Host": "box.lan"})).status == 200
    assert (await c.get("/v1/models", headers={"Origin": "https://app.example"})).status == 200
    assert (await c.get("/v1/models", headers={"Origin": "http://localhost:3000"})).status == 403


async def test_a_refused_page_does_not_keep_its_connection(doors):
    c = doors
    r = await c.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status == 403 and r.headers.get("Connection", "").lower() == "close"
    r = await c.get("/v1/models", headers={"Host": "evil.example"})
    assert r.status == 403 and r.headers.get("Connection", "").lower() == "close"
