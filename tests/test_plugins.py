"""Plugins found through real entry points (installed distributions on sys.path), their
hooks, and what happens when they fail."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anyad.config import parse_settings
from anyad.errors import ConfigError
from conftest import MODEL_ID, anyad_cmd, clean_env
from eventually import until

README = Path(__file__).resolve().parent.parent / "README.md"
BODY = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 12,
        "temperature": 0}


def install_dist(site: Path, name: str, source: str, entry: str | None = None) -> None:
    """An installed distribution as pip leaves one: the module, and its dist-info with the entry point."""
    module = f"anyad_{name}"
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[anyad.plugins]\n{name} = {entry or module}\n")


def settings(tiny_model, tmp_path, enabled, **extra):
    return parse_settings({"data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
                           "models": {MODEL_ID: {"path": str(tiny_model)}},
                           "plugins": {"enabled": enabled, **extra.pop("plugins", {})}, **extra})


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


async def reply_text(c, **body) -> tuple[int, str, dict]:
    r = await c.post("/v1/chat/completions", json={**BODY, **body})
    data = await r.json()
    text = data["choices"][0]["message"]["content"] if r.status == 200 else ""
    return r.status, text, data


def readme_block(marker: str) -> str:
    m = re.search(rf"<!-- plugin-example:{marker} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no plugin-example:{marker} block"
    return m.group(1)


async def test_the_readme_plugin_installs_with_pip_and_works(make_client, tiny_model, tmp_path, monkeypatch):
    src = tmp_path / "anyad-shout"
    src.mkdir()
    (src / "anyad_shout.py").write_text(readme_block("module"))
    (src / "pyproject.toml").write_text(readme_block("pyproject"))
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    monkeypatch.syspath_prepend(str(target))
    plain = await make_client(settings(tiny_model, tmp_path / "a", []))
    _, expected, _ = await reply_text(plain)
    c = await make_client(settings(tiny_model, tmp_path / "b", ["shout"]))
    status, text, _ = await reply_text(c)
    assert status == 200 and text == expected.upper() and text != expected
    r = await c.get("/shout")
    assert r.status == 200 and await r.json() == {"shout": "HELLO"}
    # `anyad plugins` sees it, installed and (with that config) enabled.
    env = clean_env(tmp_path)
    env["PYTHONPATH"] = str(target)
    cfg = tmp_path / "anyad.toml"
    cfg.write_text('[plugins]\nenabled = ["shout"]\n')
    out = subprocess.run(anyad_cmd("plugins", "--config", str(cfg)), env=env, capture_output=True, text=True,
                         timeout=60).stdout
    row = next(line for line in out.splitlines() if line.startswith("shout"))
    assert row.split()[1] == "yes" and "anyad-shout 0.1" in row


GUARD = """
    import anyad
    from anyad.errors import Forbidden

    seen = []

    @anyad.hookimpl
    def anyad_startup(daemon, config):
        seen.append(("startup", config))

    @anyad.hookimpl
    def anyad_before_request(request, endpoint):
        text = request.messages[-1]["content"]
        if "forbidden" in text:
            raise Forbidden("the guard says no")
        if "crash" in text:
            raise RuntimeError("the guard broke")
        request.messages = [{"role": "system", "content": "Be brief."}, *request.messages]
        return request

    @anyad.hookimpl
    async def anyad_after_reply(exchange):
        seen.append(("after", exchange.backend, exchange.finish_reason, exchange.reply["content"],
                     len(exchange.request.messages)))

    @anyad.hookimpl
    def anyad_shutdown(daemon):
        seen.append(("shutdown",))
"""


async def test_guards_rewrite_refuse_and_fail_closed(make_client, tiny_model, tmp_path, site, caplog):
    install_dist(site, "guard", GUARD)
    import anyad_guard

    c = await make_client(settings(tiny_model, tmp_path, ["guard"], plugins={"guard": {"level": 3}}))
    assert anyad_guard.seen == [("startup", {"level": 3})]
    status, text, _ = await reply_text(c)
    assert status == 200
    # after_reply runs after the reply is sent
    await until(lambda: anyad_guard.seen[-1][0] == "after", what="after_reply")
    assert anyad_guard.seen[-1] == ("after", MODEL_ID, "length", text, 2)  # the system message went in
    status, _, data = await reply_text(c, messages=[{"role": "user", "content": "something forbidden"}])
    assert status == 403 and data["error"]["message"] == "the guard says no"
    caplog.set_level(logging.ERROR)
    status, _, data = await reply_text(c, messages=[{"role": "user", "content": "make it crash"}])
    assert status == 500 and data["error"]["code"] == "plugin_error" and "'guard'" in data["error"]["message"]
    assert "Traceback" not in str(data) and "the guard broke" in caplog.text  # the log has it, the client not
    await c.close()
    assert anyad_guard.seen[-1] == ("shutdown",)


BROKEN = """
    import anyad

    @anyad.hookimpl
    def anyad_stream_chunk(chunk):
        raise ValueError("chunk hook broke")

    @anyad.hookimpl
    def anyad_after_reply(exchange):
        raise ValueError("after hook broke")
"""


async def test_a_failing_plugin_is_logged_and_the_request_goes_on(make_client, tiny_model, tmp_path, site,
                                                                 caplog):
    install_dist(site, "broken", BROKEN)
    caplog.set_level(logging.ERROR)
    c = await make_client(settings(tiny_model, tmp_path, ["broken"]))
    status, text, _ = await reply_text(c)
    assert status == 200 and text
    r = await c.post("/v1/chat/completions", json={**BODY, "stream": True})
    raw = await r.text()
    assert r.status == 200 and raw.rstrip().endswith("data: [DONE]")
    await until(lambda: "after hook broke" in caplog.text, what="after_reply")
    assert "chunk hook broke" in caplog.text and "after hook broke" in caplog.text
    assert (await c.get("/health")).status == 200


ECHO = """
    import anyad
    from anyad.backend import Backend, ModelInfo
    from anyad.stream import Chunk, Usage


    class Echo(Backend):
        kind = "echo"
        remote = True

        def __init__(self, name):
            self.name = name

        @classmethod
        def from_provider(cls, name, settings):
            return cls(name)

        def models(self):
            return [ModelInfo(id=f"{self.name}/parrot", owned_by=self.name, created=0)]

        async def chat(self, request, model):
            yield Chunk(text="echo: " + request.messages[-1]["content"])
            yield Chunk(finish_reason="stop", usage=Usage(1, 1))


    @anyad.hookimpl
    def anyad_register_backends(register):
        register("echo", Echo)


    @anyad.hookimpl
    def anyad_remote_request(request, target):
        request.messages = [{**m, "content": m["content"].replace("secret", "[hidden]")} for m in request.messages]
        return request
"""


async def test_a_plugin_adds_a_backend_and_sees_what_leaves_the_machine(make_client, tiny_model, tmp_path, site):
    install_dist(site, "echo", ECHO)
    s = settings(tiny_model, tmp_path, ["echo"], providers={"parrots": {"backend": "echo",
                                                                        "base_url": "http://127.0.0.1:9"}})
    c = await make_client(s)
    status, text, _ = await reply_text(c, model="parrots/parrot",
                                       messages=[{"role": "user", "content": "my secret plan"}])
    assert status == 200 and text == "echo: my [hidden] plan"
    models = [m["id"] for m in (await (await c.get("/v1/models")).json())["data"]]
    assert "parrots/parrot" in models


async def test_plugins_run_only_when_enabled(make_client, tiny_model, tmp_path, site):
    install_dist(site, "guard", GUARD)
    c = await make_client(settings(tiny_model, tmp_path, []))
    status, _, _ = await reply_text(c, messages=[{"role": "user", "content": "something forbidden"}])
    assert status == 200  # installed, not enabled: no guard
    with pytest.raises(ConfigError, match="no plugin 'nope' is installed"):
        await make_client(settings(tiny_model, tmp_path, ["nope"]))
    install_dist(site, "typo", "import anyad\n@anyad.hookimpl\ndef anyad_before_requets(request):\n    pass\n")
    with pytest.raises(ConfigError, match="anyad_before_requets"):
        await make_client(settings(tiny_model, tmp_path, ["typo"]))
