"""``anyad secrets`` against a real keyring backend (the file backend of keyrings.alt),
and a clear message where there is no backend at all."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, wait_http

SECRET = "sk-test-Zq8vXw3Lm9Pa7Rt2"
FILE_BACKEND = "keyrings.alt.file.PlaintextKeyring"


def run(tmp_path, *args, input=None, backend=FILE_BACKEND):
    env = clean_env(tmp_path)  # XDG_DATA_HOME in tmp_path: the backend's file lives there
    env["PYTHON_KEYRING_BACKEND"] = backend
    return subprocess.run(anyad_cmd("secrets", *args), env=env, capture_output=True, text=True, input=input,
                          timeout=60)


def test_set_list_resolve_delete(tmp_path):
    p = run(tmp_path, "set", "openai", input=SECRET + "\n")
    assert p.returncode == 0, p.stderr
    assert 'api_key = "keyring:openai"' in p.stdout
    run(tmp_path, "set", "anthropic", input="another-value")
    p = run(tmp_path, "list")
    assert p.stdout.split() == ["anthropic", "openai"]
    # The daemon's resolver reads it back from the same keyring.
    env = clean_env(tmp_path)
    env["PYTHON_KEYRING_BACKEND"] = FILE_BACKEND
    got = subprocess.run([sys.executable, "-c", "from anyad.secrets import resolve; "
                          "print(resolve('keyring:openai') == " + repr(SECRET) + ")"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert got.stdout.strip() == "True", got.stderr
    assert run(tmp_path, "delete", "openai").returncode == 0
    assert run(tmp_path, "list").stdout.split() == ["anthropic"]
    p = run(tmp_path, "delete", "openai")
    assert p.returncode == 1 and "no secret 'openai'" in p.stderr
    p = run(tmp_path, "set", "bad name!", input="x")
    assert p.returncode == 2 and "secret name" in p.stderr
    p = run(tmp_path, "set", "empty", input="\n")
    assert p.returncode == 2 and "empty" in p.stderr


def test_no_secret_value_is_ever_printed(tmp_path):
    outputs = [run(tmp_path, "set", "openai", input=SECRET), run(tmp_path, "list"),
               run(tmp_path, "delete", "openai"), run(tmp_path, "delete", "openai")]
    for p in outputs:
        assert SECRET not in p.stdout and SECRET not in p.stderr


def test_without_a_keyring_backend_the_error_says_what_to_do(tmp_path):
    p = run(tmp_path, "set", "openai", input=SECRET, backend="keyring.backends.fail.Keyring")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "keyrings.alt" in p.stderr and "Secret Service" in p.stderr and "cred:" in p.stderr
    assert SECRET not in p.stderr
    p = run(tmp_path, "list", backend="keyring.backends.fail.Keyring")
    assert p.returncode == 2 and "no usable keyring backend" in p.stderr


def test_secret_changes_go_into_the_audit_log(tmp_path):
    assert run(tmp_path, "set", "openai", input=SECRET).returncode == 0
    assert run(tmp_path, "delete", "openai").returncode == 0
    env = clean_env(tmp_path)
    p = subprocess.run(anyad_cmd("audit", "--json"), env=env, capture_output=True, text=True, timeout=60)
    rows = json.loads(p.stdout)
    assert [(r["action"], r["target"]) for r in rows] == [("secret.delete", "openai"), ("secret.set", "openai")]
    assert all(r["actor"].startswith("cli:") for r in rows)
    assert SECRET not in p.stdout
    table = subprocess.run(anyad_cmd("audit"), env=env, capture_output=True, text=True, timeout=60).stdout
    assert "secret.set" in table and "ACTOR" in table


SECRET_SERVICE_TOOLS = ("dbus-run-session", "gnome-keyring-daemon", "secret-tool")


@pytest.mark.skipif(not all(shutil.which(t) for t in SECRET_SERVICE_TOOLS),
                    reason="needs dbus-run-session, gnome-keyring-daemon and secret-tool (.ci/run installs them)")
def test_the_secret_service_over_d_bus(tmp_path):
    """The real desktop keyring: GNOME Keyring's Secret Service on a private session bus."""
    home = tmp_path / "home"
    home.mkdir()
    script = tmp_path / "inside.sh"
    py = sys.executable
    script.write_text(f"""set -e
eval "$(printf pw | gnome-keyring-daemon --unlock --components=secrets)"
printf '%s' "$SECRET" | {py} -m anyad secrets set openai
{py} -m anyad secrets list
echo "resolved=$({py} -c "from anyad.secrets import resolve; print(resolve('keyring:openai') == '$SECRET')")"
echo "secret-tool=$(secret-tool lookup service anyad username openai)"
{py} -m anyad secrets delete openai
echo "after=$(secret-tool lookup service anyad username openai || true)"
""")
    env = clean_env(tmp_path)
    env.update(HOME=str(home), SECRET=SECRET, PYTHON_KEYRING_BACKEND="keyring.backends.SecretService.Keyring")
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    p = subprocess.run(["dbus-run-session", "--", "bash", str(script)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert 'api_key = "keyring:openai"' in out and "\nopenai\n" in out
    assert "resolved=True" in out
    # What the Secret Service itself holds, read with its own tool: the value went there.
    assert f"secret-tool={SECRET}" in out and "after=\n" in out
    assert out.count(SECRET) == 1  # only secret-tool's own lookup printed it, never anyad


async def test_no_secret_reaches_a_log_status_metrics_the_history_or_an_error(tmp_path, tiny_model, aiohttp_server):
    """A provider key and a client key from the keyring, through a real `anyad serve`; then
    every place anyad writes is searched for them. The fake provider quotes the key it was
    sent in its 401, as some real ones do."""
    provider_key, client_key = "sk-prov-Hh7Kq2Lz9Wx4Nc", "anyad-client-Pq5Rt8Vm3Zb6"
    seen: list[str] = []

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(request.headers.get("Authorization", ""))
        if body["model"] == "reject":
            return web.json_response({"error": {"message": f"Incorrect API key provided: "
                                                f"{request.headers['Authorization'][7:]}",
                                                "type": "invalid_request_error", "code": "invalid_api_key"}},
                                     status=401)
        return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream = await aiohttp_server(app)
    assert run(tmp_path, "set", "provider", input=provider_key).returncode == 0
    assert run(tmp_path, "set", "client", input=client_key).returncode == 0
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f"""data_dir = "{data}"
[server]
port = {port}
log_level = "debug"
api_keys = ["keyring:client"]
[models.{MODEL_ID}]
path = "{tiny_model}"
[providers.up]
base_url = "http://127.0.0.1:{upstream.port}/v1"
api_key = "keyring:provider"
max_retries = 0
[[routes]]
name = "careful"
targets = ["up/reject", "{MODEL_ID}"]
""")
    env = clean_env(tmp_path)
    env["PYTHON_KEYRING_BACKEND"] = FILE_BACKEND
    log_file = tmp_path / "daemon.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(anyad_cmd("serve", "--config", str(cfg)), env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    replies: list[str] = []
    try:
        await asyncio.to_thread(wait_http, base + "/health", 30.0, proc)
        auth = {"Authorization": f"Bearer {client_key}"}
        async with aiohttp.ClientSession() as http:
            for model, expect in (("up/ok", 200), ("up/reject", 401), ("careful", 200)):
                async with http.post(base + "/v1/chat/completions", headers=auth,
                                     json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 2}) as r:
                    assert r.status == expect
                    replies.append(await r.text() + str(dict(r.headers)))
            async with http.post(base + "/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                                 json={"model": "up/ok", "messages": []}) as r:
                assert r.status == 401
                replies.append(await r.text())
            for path in ("/api/status", "/metrics", "/api/conversations", "/v1/models"):
                async with http.get(base + path, headers=auth) as r:
                    assert r.status == 200
                    replies.append(await r.text())
        assert "redacted" in replies[1]  # the provider's quote of the key, scrubbed
    finally:
        proc.terminate()
        proc.wait(30)
    assert seen and all(h == f"Bearer {provider_key}" for h in seen)  # the key did reach the provider
    exported = subprocess.run(anyad_cmd("history", "--config", str(cfg), "export"), env=env, capture_output=True,
                              text=True, timeout=60)
    audit = subprocess.run(anyad_cmd("audit", "--json", "--config", str(cfg)), env=env, capture_output=True,
                           text=True, timeout=60)
    assert '"up/ok"' in exported.stdout and '"request"' in audit.stdout
    places = {"log": log_file.read_text(), "replies": "\n".join(replies), "history": exported.stdout,
              "audit": audit.stdout}
    for f in data.rglob("*"):  # the database, its WAL, anything else the daemon wrote
        if f.is_file():
            places[str(f.relative_to(data))] = f.read_bytes().decode("latin-1")
    assert "DEBUG anyad.server: request" in places["log"]  # the most talkative level was on
    for secret in (provider_key, client_key):
        for where, text in places.items():
            assert secret not in text, f"a secret appears in {where}"
