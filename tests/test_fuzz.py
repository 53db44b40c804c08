"""Property-based fuzzing of the public API from its own OpenAPI document (schemathesis),
against a real ``anyad serve`` with the tiny local model and a fake remote provider.

Whatever the body, the daemon answers below 500, errors come in OpenAI's shape, every
reply matches the document, and the daemon is alive afterwards. Generation stays short
whatever max_tokens says: the model's context is 128 tokens.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from anyad.openapi import document
from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, wait_http
from fakes import FakeOpenAI

# Fuzzed model names mostly miss (a 404 each); most cases are steered onto models that answer.
MODELS = (MODEL_ID, "up/gpt-x", MODEL_ID, "no-such-model")


def _fake_provider() -> str:
    """The fake provider on its own event loop in a thread (the fuzzing below is synchronous)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(FakeOpenAI().app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running daemon: (its base URL, the file its log goes to)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "config.toml"
    config.write_text(f'data_dir = "{tmp / "data"}"\n'
                      f'[models.{MODEL_ID}]\npath = "{tiny_model}"\nn_ctx = 128\n'
                      f'[providers.up]\nbase_url = "{_fake_provider()}"\nmodels = ["gpt-x"]\n')
    port = free_port()
    log = tmp / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen(anyad_cmd("serve", "--config", str(config), "--port", str(port)),
                                env=clean_env(tmp), stdout=err, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/ready", proc=proc)
        yield base, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# Loaded eagerly from the module that serves it (schemathesis' lazy loading from a fixture
# does not run on pytest 9); the first test proves the daemon serves this very document.
schema = schemathesis.openapi.from_dict(document())


def test_the_daemon_serves_the_document(daemon):
    with urllib.request.urlopen(daemon[0] + "/openapi.json", timeout=30) as r:
        served = json.load(r)
    assert served == json.loads(json.dumps(document()))
    ops = {(m, p) for p, item in served["paths"].items() for m in item if m in ("get", "post", "delete")}
    assert {("post", "/v1/chat/completions"), ("post", "/api/chat"), ("post", "/v1/completions"),
            ("post", "/v1/embeddings"), ("get", "/v1/models/{id}"), ("post", "/v1/messages"),
            ("post", "/v1/messages/count_tokens"), ("post", "/v1/responses"), ("get", "/v1/responses/{id}"),
            ("delete", "/v1/responses/{id}"),
            ("get", "/v1/models"), ("get", "/health"), ("get", "/ready"), ("get", "/api/conversations"),
            ("get", "/api/conversations/{id}"), ("delete", "/api/conversations/{id}")} <= ops


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every error is {"error": {message, type, param, code}} (on the Messages door
    Anthropic's {"type": "error", "error": {type, message}}), with no traceback in it."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    if case.path.startswith("/v1/messages"):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_error_shape]


@schema.parametrize()
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_the_api_holds_against_fuzzed_requests(case, daemon):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODELS[len(case.body["model"]) % len(MODELS)]
    case.call_and_validate(base_url=daemon[0], checks=CHECKS, timeout=120)


def test_the_daemon_is_alive_and_logged_no_traceback(daemon):
    """Runs after the fuzzing (same module, in file order)."""
    base, log = daemon
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        assert r.status == 200
    req = urllib.request.Request(base + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"model": MODEL_ID, "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "unhandled error" not in text, text[-4000:]
