from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from anyad.config import Settings, parse_settings
from anyad.daemon import Daemon
from anyad.plugins import ollama as ollama_plugin
from anyad.server import build_app

sys.path.insert(0, str(Path(__file__).parent))
import ggufmaker  # noqa: E402

MODEL_ID = "tiny"

TEMPLATES = Path(__file__).parent / "templates"
# Tiny models carrying real families' chat templates: the tool-call and thinking tests
# of every door (OpenAI, Ollama, agent frameworks) run on the same ones.
FAMILIES = {"hermes": "hermes-qwen2.5-7b-instruct", "llama3": "llama3-llama-3.1-8b-instruct",
            "mistral": "mistral-mistral-nemo-instruct-2407"}
THINKING = {"qwen3": "hermes-qwen3-0.6b", "r1": "generic-deepseek-r1-distill-qwen-32b"}

# Small schemas: a whole call (the tiny vocabulary spends a token a character) fits in a
# bounded max_tokens.
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "clock", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path, monkeypatch):
    """Settings without a data_dir would use ~/.local/share/anyad: keep every test's in its tmp_path."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GGUF (random weights, byte-level BPE, ChatML template), made once per session."""
    return ggufmaker.write_model(tmp_path_factory.mktemp("models") / f"{MODEL_ID}.gguf")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny model per family, each with that family's real chat template."""
    d = tmp_path_factory.mktemp("family-models")
    return {name: ggufmaker.write_model(d / f"{name}.gguf",
                                        chat_template=(TEMPLATES / f"{stem}.jinja").read_text())
            for name, stem in {**FAMILIES, **THINKING}.items()}


def settings_for(tmp_path: Path, models: dict[str, Path], **extra: Any) -> Settings:
    return parse_settings({"data_dir": str(tmp_path / "data"),
                           "models": {name: {"path": str(path)} for name, path in models.items()}, **extra})


@pytest.fixture
async def sdk_on(make_client, tmp_path):
    """A client library on a fresh daemon: ``await sdk_on(models, sdk, **settings)`` serves
    ``models`` (name → GGUF) and returns ``sdk(test client)`` carrying ``.anyad`` (the test
    client); every one is closed at the end."""
    opened = []

    async def make(models: dict[str, Path], sdk: Any, **extra: Any) -> Any:
        c = await make_client(settings_for(tmp_path, models, **extra))
        client = sdk(c)
        client.anyad = c
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


def openai_sdk(c: Any) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="not-needed", max_retries=0)


def anthropic_sdk(c: Any) -> Any:
    import anthropic

    return anthropic.AsyncAnthropic(base_url=str(c.make_url("")), api_key="sk-none", max_retries=0)


def make_settings(model: Path, tmp_path: Path, **model_opts):
    return parse_settings({"data_dir": str(tmp_path / "data"),
                           "models": {MODEL_ID: {"path": str(model), **model_opts}}})


@pytest.fixture
def settings(tiny_model: Path, tmp_path: Path):
    return make_settings(tiny_model, tmp_path)


@pytest.fixture
async def make_client(aiohttp_client):
    """Start the real app (real worker processes) on a loopback port; returns the test client."""

    async def make(settings, probe=None):
        daemon = Daemon(settings, probe)
        client = await aiohttp_client(build_app(daemon), server_kwargs={"handler_cancellation": True})
        client.daemon = daemon
        return client

    return make


@pytest.fixture
def start_fake(aiohttp_server):
    """Start a fake OpenAI-compatible provider on loopback: (fake, its base URL)."""
    from fakes import FakeOpenAI

    async def start(mode: str = "ok", **kw):
        fake = FakeOpenAI(mode, **kw)
        server = await aiohttp_server(fake.app())
        return fake, f"http://127.0.0.1:{server.port}/v1"

    return start


@pytest.fixture
def start_replicas(aiohttp_server):
    """Start ``n`` fake replicas of a pool on loopback: [(fake, its base URL)]."""
    from fakes import FakeReplica

    async def start(n: int, **kw):
        out = []
        for _ in range(n):
            fake = FakeReplica(**kw)
            server = await aiohttp_server(fake.app())
            out.append((fake, f"http://127.0.0.1:{server.port}/v1"))
        return out

    return start


@pytest.fixture
async def gateway(make_client, tiny_model, tmp_path, start_fake):
    """The tiny model, a fake provider "up" serving "gpt-x" and the Ollama listener on a free port.

    The test client carries ``fake``, ``ollama_url`` and ``ollama`` (an aiohttp session on the listener).
    """
    fake, url = await start_fake()
    s = parse_settings({"data_dir": str(tmp_path / "data"),
                        "models": {MODEL_ID: {"path": str(tiny_model)}},
                        "providers": {"up": {"base_url": url, "models": ["gpt-x"]}},
                        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}})
    c = await make_client(s)
    host, port = ollama_plugin.address(c.daemon)
    c.fake = fake
    c.ollama_url = f"http://{host}:{port}"
    async with aiohttp.ClientSession(c.ollama_url) as ollama:
        c.ollama = ollama
        yield c


@pytest.fixture
async def client(make_client, settings):
    c = await make_client(settings)
    await c.daemon.scheduler.load(MODEL_ID)
    return c


@pytest.fixture
async def sdk(client):
    """The official openai client on ``client``'s daemon."""
    import openai

    c = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="not-needed", max_retries=0)
    yield c
    await c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anyad_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "anyad", *args]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment where no user or system config is found by accident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYAD_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    return env


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"anyad exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")
