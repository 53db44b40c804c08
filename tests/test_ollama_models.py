"""The Ollama door's model store, driven by the official `ollama` client: pull (with its
progress) from a fake Ollama-style registry on loopback, copy, delete, create (from a GGUF
path, a model, uploaded blobs, a Modelfile; SYSTEM, PARAMETERs and TEMPLATE applied), and
the chat on what they made; Ollama's names; raw, suffix and context on generate. Digests
that do not match, hostile names and keys that are not an admin's are refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import aiohttp
import ollama
import pytest
from aiohttp import web
from yarl import URL

import ggufmaker
from anyad import download, ollama_store
from anyad.config import parse_settings
from anyad.ollama_store import OllamaStore, StoreError, blob_name, parse_name
from anyad.plugins import ollama as ollama_plugin
from anyad.plugins import ollama_models
from conftest import MODEL_ID
from fakes import FakeOllamaRegistry

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """Ollama's models folder for the test (what discovery and the door read)."""
    root = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


@pytest.fixture
async def registry(aiohttp_server, tiny_model):
    """A fake registry serving ``tinyllama`` (the tiny GGUF, with a license layer)."""
    fake = FakeOllamaRegistry()
    fake.publish("tinyllama", tiny_model.read_bytes(), license="MIT, for the tests")
    server = await aiohttp_server(fake.app())
    fake.url = f"http://127.0.0.1:{server.port}"
    fake.host = f"127.0.0.1:{server.port}"
    return fake


@pytest.fixture
def start_door(make_client, tiny_model, tmp_path, store):
    """A daemon with the tiny model and the Ollama listener (pulling from ``registry`` when
    given); the test client carries ``ollama_url`` and ``api`` (the official client)."""

    async def start(registry: FakeOllamaRegistry | None = None, models: dict | None = None, **extra):
        door = {"port": 0, **({"registry": registry.url} if registry is not None else {})}
        s = parse_settings({"data_dir": str(tmp_path / "data"),
                            "models": {MODEL_ID: {"path": str(tiny_model)}, **(models or {})},
                            "plugins": {"enabled": ["ollama"], "ollama": door}, **extra})
        c = await make_client(s)
        host, port = ollama_plugin.address(c.daemon)
        c.ollama_url = f"http://{host}:{port}"
        c.api = ollama.AsyncClient(host=c.ollama_url)
        return c

    return start


def blob(store: Path, digest: str) -> Path:
    return store / "blobs" / digest.replace(":", "-")


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def names(api: ollama.AsyncClient) -> list[str]:
    return [m.model for m in (await api.list()).models]


async def refused(call, status: int) -> str:
    with pytest.raises(ollama.ResponseError) as err:
        result = await call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
    assert err.value.status_code == status, err.value.error
    return err.value.error


async def test_pull_streams_progress_and_the_model_is_served_at_once(start_door, registry, store):
    c = await start_door(registry)
    raw = registry.manifests[("library", "tinyllama", "latest")]
    manifest = json.loads(raw)
    parts = [p async for p in await c.api.pull("tinyllama", stream=True)]
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    for layer in [manifest["config"], *manifest["layers"]]:
        mine = [p for p in parts if p.digest == layer["digest"]]
        assert mine and {p.status for p in mine} == {f"pulling {layer['digest'][7:19]}"}
        assert mine[-1].completed == mine[-1].total == layer["size"]
        assert blob(store, layer["digest"]).read_bytes() == registry.blobs[layer["digest"]]
    assert (store / "manifests" / registry.host / "library" / "tinyllama" / "latest").read_bytes() == raw
    assert not [p for p in (store / "blobs").iterdir() if p.name.startswith(".")]  # no .part left behind

    # Listed and served at once, on both listeners, without a restart.
    tags = {m.model: m for m in (await c.api.list()).models}
    assert tags["tinyllama:latest"].digest == hashlib.sha256(raw).hexdigest()
    assert tags["tinyllama:latest"].size == manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
    v1 = await (await c.get("/v1/models")).json()
    assert "tinyllama:latest" in [m["id"] for m in v1["data"]]
    r = await c.api.chat(model="tinyllama", messages=HI, options={"num_predict": 3})
    assert r.done and 0 < r.eval_count <= 3 and r.model == "tinyllama"
    r = await c.post("/v1/chat/completions", json={"model": "tinyllama:latest", "messages": HI, "max_tokens": 2})
    assert r.status == 200
    show = await c.api.show("tinyllama")
    assert show.license == "MIT, for the tests" and show.details.family == "llama"

    # Pulled again (stream: false): the manifest is read, no blob fetched again.
    before = len(registry.requests)
    assert (await c.api.pull("tinyllama:latest")).status == "success"
    assert [p for p in registry.requests[before:] if "/blobs/" in p] == []

    # A model the registry does not have: a 404, before anything is written.
    assert "no model" in await refused(lambda: c.api.pull("nothing-there"), 404)

    # The next daemon on the same store serves it from the start.
    again = await start_door(registry)
    assert "tinyllama:latest" in await names(again.api)


async def test_pull_needs_a_configured_registry(start_door, store):
    c = await start_door()
    error = await refused(lambda: c.api.pull("tinyllama"), 400)
    assert "no registry is configured" in error and "plugins.ollama" in error
    assert files(store) == []


async def test_a_blob_that_does_not_match_its_digest_leaves_nothing(start_door, registry, store):
    model = json.loads(registry.manifests[("library", "tinyllama", "latest")])["layers"][0]["digest"]
    registry.corrupt.add(model)
    c = await start_door(registry)
    error = await refused(lambda: c.api.pull("tinyllama", stream=True), -1)  # in the stream, as Ollama does
    assert "SHA-256 mismatch" in error
    assert await refused(lambda: c.api.pull("tinyllama"), 502)  # stream: false: the HTTP status
    assert not blob(store, model).exists()
    assert not [p for p in files(store) if p.name.endswith(".part")]
    assert files(store / "manifests") == []
    assert "tinyllama:latest" not in await names(c.api)
    registry.corrupt.clear()  # the registry mended: the same pull completes
    assert (await c.api.pull("tinyllama")).status == "success"
    assert blob(store, model).is_file() and "tinyllama:latest" in await names(c.api)


async def test_hostile_names_are_refused_before_anything_is_touched(start_door, registry, store, tmp_path):
    c = await start_door(registry)
    for name in ("../../etc/passwd", "library/../x", "/etc/passwd", "x:../y", "a/b/c/d", "evil\\x", "x@sha256:00",
                 "-leading-dash", "x" * 81):
        assert "invalid model name" in await refused(lambda name=name: c.api.pull(name), 400)
        assert "invalid model name" in await refused(lambda name=name: c.api.delete(name), 400)
    # A name on another host: anyad pulls from the configured registry only (nothing is fetched).
    before = len(registry.requests)
    assert "host" in await refused(lambda: c.api.pull("elsewhere:9999/library/x"), 400)
    assert len(registry.requests) == before
    await c.api.pull("tinyllama")
    await refused(lambda: c.api.copy("tinyllama", "../../escape"), 400)
    await refused(lambda: c.api.create(model="../up", from_="tinyllama"), 400)
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.rglob("up"))
    async with aiohttp.ClientSession(c.ollama_url) as s:
        for path in ("/api/blobs/..%2F..%2Fetc%2Fpasswd", "/api/blobs/sha256:..", "/api/blobs/sha256-x"):
            async with s.head(path) as r:
                assert r.status == 400, path
    # A registry whose manifest names a blob outside the store: refused, nothing written.
    registry.manifests[("library", "evil", "latest")] = json.dumps(
        {"schemaVersion": 2, "layers": [{"mediaType": FakeOllamaRegistry.MODEL, "digest": "sha256:../../../x",
                                         "size": 4}]}).encode()
    assert "not valid" in await refused(lambda: c.api.pull("evil"), 502)
    assert not (store / "manifests" / registry.host / "library" / "evil").exists()


async def test_copy_is_an_alias_and_delete_keeps_what_another_model_uses(start_door, registry, store):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    manifest = json.loads(registry.manifests[("library", "tinyllama", "latest")])
    layers = [blob(store, x["digest"]) for x in [manifest["config"], *manifest["layers"]]]
    assert (await c.api.copy("tinyllama", "alias")).status == "success"
    tags = {m.model: m for m in (await c.api.list()).models}
    assert tags["alias:latest"].digest == tags["tinyllama:latest"].digest  # the same manifest: the same blobs
    assert (await c.api.generate(model="alias", prompt="hi", options={"num_predict": 2})).done
    assert [m.model for m in (await c.api.ps()).models] == ["alias:latest"]

    await c.api.delete("tinyllama:latest")
    assert "tinyllama:latest" not in await names(c.api) and "alias:latest" in await names(c.api)
    assert all(p.is_file() for p in layers)  # alias still uses them
    await c.api.delete("library/alias")  # loaded: unloaded with it
    assert "alias:latest" not in await names(c.api) and (await c.api.ps()).models == []
    assert "alias:latest" not in c.daemon.scheduler.models and "alias:latest" not in c.daemon.local
    assert files(store) == []

    assert await refused(lambda: c.api.delete("nothing-here"), 404) == "model 'nothing-here' not found"
    assert "not found" in await refused(lambda: c.api.copy("nothing-here", "x"), 404)
    error = await refused(lambda: c.api.delete(MODEL_ID), 400)  # the config file's model is not the store's
    assert "config" in error and MODEL_ID in await names(c.api)
    await c.api.pull("tinyllama")
    assert "is 'tiny', which comes from the config file" in await refused(
        lambda: c.api.copy("tinyllama", f"{MODEL_ID}:latest"), 400)


async def test_create_from_a_gguf_path_applies_its_system_and_parameters(start_door, tiny_model, store):
    c = await start_door()
    parts = [p async for p in await c.api.create(
        model="pirate", from_=str(tiny_model), system="You are a pirate. Answer like one.",
        parameters={"num_predict": 3, "temperature": 0, "stop": ["\n\n"]}, stream=True)]
    assert parts[-1].status == "success" and any(p.status.startswith("creating new layer") for p in parts)
    assert "pirate:latest" in await names(c.api)
    assert (store / "manifests" / "localhost" / "library" / "pirate" / "latest").is_file()

    base = await c.api.generate(model=MODEL_ID, prompt="hi", options={"num_predict": 1})
    r = await c.api.generate(model="pirate", prompt="hi")  # no options: the model's PARAMETERs
    assert r.done and 0 < r.eval_count <= 3
    assert r.prompt_eval_count > base.prompt_eval_count  # its SYSTEM went before the prompt
    own = await c.api.generate(model="pirate", prompt="hi", system="Hi.", options={"num_predict": 1})
    assert own.eval_count == 1 and own.prompt_eval_count < r.prompt_eval_count  # the request's own win
    chat = await c.api.chat(model="pirate:latest", messages=HI)
    assert chat.done and chat.eval_count <= 3 and chat.prompt_eval_count == r.prompt_eval_count
    show = await c.api.show("pirate")
    assert 'SYSTEM """You are a pirate. Answer like one."""' in show.modelfile and "num_predict" in show.parameters
    assert "FROM " in show.modelfile and "PARAMETER temperature 0" in show.modelfile
    # The same defaults on the main listener's chat completions.
    r2 = await c.post("/v1/chat/completions", json={"model": "pirate", "messages": HI})
    body = await r2.json()
    assert r2.status == 200 and body["usage"]["completion_tokens"] <= 3
    assert body["usage"]["prompt_tokens"] == chat.prompt_eval_count

    # From that model, by a Modelfile: its PARAMETERs inherited, its SYSTEM replaced, MESSAGEs before the chat.
    async with aiohttp.ClientSession(c.ollama_url) as s:
        async with s.post("/api/create", json={"model": "terse", "stream": False, "modelfile": (
                "# a comment\nFROM pirate\nPARAMETER num_predict 2\nSYSTEM \"\"\"Be\nshort.\"\"\"\n"
                "MESSAGE user Hello\nMESSAGE assistant Ahoy\n")}) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "success"
    show = await c.api.show("terse")
    assert 'SYSTEM """Be\nshort."""' in show.modelfile and 'MESSAGE assistant """Ahoy"""' in show.modelfile
    assert "temperature" in show.parameters and "num_predict" in show.parameters
    r = await c.api.chat(model="terse", messages=HI)
    same = await c.api.chat(model=MODEL_ID, messages=[{"role": "system", "content": "Be\nshort."},
                                                      {"role": "user", "content": "Hello"},
                                                      {"role": "assistant", "content": "Ahoy"}, *HI],
                            options={"num_predict": 1})
    assert r.eval_count <= 2 and r.prompt_eval_count == same.prompt_eval_count  # SYSTEM, then the MESSAGEs

    # Uploaded as a blob (what `ollama create` does with a local file), then created from it.
    digest = await c.api.create_blob(tiny_model)
    assert (await c.api.create(model="blobbed", files={"tiny.gguf": digest})).status == "success"
    assert (await c.api.generate(model="blobbed", prompt="hi", options={"num_predict": 1})).done


async def test_create_with_a_template_renders_it(start_door):
    c = await start_door()
    await c.api.create(model="plain", from_=MODEL_ID, template="{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}")
    raw = await c.api.generate(model=MODEL_ID, prompt="hello there", raw=True, options={"num_predict": 1})
    templated = await c.api.generate(model="plain", prompt="hello there", options={"num_predict": 1})
    assert templated.prompt_eval_count == raw.prompt_eval_count  # the prompt alone: no chat template around it
    assert (await c.api.show("plain")).template == "{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}"
    chat = await c.api.chat(model="plain", messages=HI, options={"num_predict": 1})
    assert chat.done


@pytest.mark.parametrize("request_fields, status, says", [
    ({"from_": "./tiny.gguf"}, 400, "absolute path"),
    ({"from_": "no-such-model"}, 404, "no such model"),
    ({"from_": MODEL_ID, "template": "{{ if .System }}"}, 400, "TEMPLATE"),
    ({"from_": MODEL_ID, "parameters": {"mirostat": 2}}, 400, "mirostat"),
    ({"from_": MODEL_ID, "parameters": {"temperature": 5}}, 400, "temperature"),
    ({"from_": MODEL_ID, "parameters": {"bogus": 1}}, 400, "unknown parameter"),
    ({"from_": MODEL_ID, "quantize": "q4_K_M"}, 400, "quantize"),
    ({}, 400, "FROM is required"),
    ({"files": {"x.gguf": "sha256:" + "0" * 64}}, 400, "upload it first"),
    ({"from_": MODEL_ID, "files": {"x.gguf": "sha256:" + "0" * 64}}, 400, "give one of them"),
])
async def test_create_refuses_what_it_cannot_make(start_door, store, request_fields, status, says):
    c = await start_door()
    error = await refused(lambda: c.api.create(model="made", **request_fields), status)
    assert says in error
    assert "made:latest" not in await names(c.api) and files(store / "manifests") == []


async def test_create_from_a_file_that_is_not_a_gguf_model(start_door, tmp_path):
    c = await start_door()
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert "not a GGUF" in await refused(lambda: c.api.create(model="x", from_=str(text)), 400)
    assert "directory" in await refused(lambda: c.api.create(model="x", from_=str(tmp_path)), 400)
    assert "..'" in await refused(lambda: c.api.create(model="x", from_=str(tmp_path / ".." / "x.gguf")), 400)
    async with aiohttp.ClientSession(c.ollama_url) as s:  # an upload whose bytes are not its digest
        async with s.post("/api/blobs/sha256:" + "1" * 64, data=b"GGUF and more") as r:
            assert r.status == 400 and "digest mismatch" in (await r.json())["error"]
    assert not [p for p in tmp_path.rglob("*") if ".upload-" in p.name]


async def test_only_an_admin_key_changes_the_store(start_door, registry, tiny_model, monkeypatch):
    monkeypatch.setenv("ROOT_KEY", "root-key-1")
    monkeypatch.setenv("USER_KEY", "user-key-2")
    monkeypatch.setenv("SOME_KEY", "some-key-3")
    c = await start_door(registry, keys={"root": {"key": "env:ROOT_KEY", "role": "admin"},
                                         "u": {"key": "env:USER_KEY", "role": "user"},
                                         "some": {"key": "env:SOME_KEY", "role": "admin", "models": ["tiny*"]}})

    def client(key: str) -> ollama.AsyncClient:
        return ollama.AsyncClient(host=c.ollama_url, headers={"Authorization": f"Bearer {key}"})

    user, root, some = client("user-key-2"), client("root-key-1"), client("some-key-3")
    for call in (lambda: user.pull("tinyllama"), lambda: user.delete(MODEL_ID), lambda: user.copy(MODEL_ID, "x"),
                 lambda: user.create(model="x", from_=str(tiny_model))):
        assert "admin" in await refused(call, 403)
    await refused(lambda: ollama.AsyncClient(host=c.ollama_url).pull("tinyllama"), 401)
    assert (await root.pull("tinyllama")).status == "success"
    assert (await user.generate(model="tinyllama", prompt="hi", options={"num_predict": 1})).done
    await refused(lambda: user.delete("tinyllama"), 403)
    # An admin key held to some models: the names it may not use are refused.
    await refused(lambda: some.copy("tinyllama", "other"), 403)
    assert (await some.copy("tinyllama", "tinycopy")).status == "success"
    assert "tinyllama:latest" in await names(root)
    # Files are no model's: a key held to model patterns may not make a model of one (any path, any blob).
    assert "held to none" in await refused(lambda: some.create(model="tinyfile", from_=str(tiny_model)), 403)
    digest = await root.create_blob(tiny_model)
    assert "held to none" in await refused(lambda: some.create(model="tinyblob", files={"t.gguf": digest}), 403)
    assert (await some.create(model="tinyderived", from_="tinyllama", system="Hi.")).status == "success"
    # A model's name is held to the key's patterns, whatever it is made from.
    assert "may not use" in await refused(lambda: some.create(model="other", from_="tinyllama"), 403)
    assert (await root.create(model="tinyfile", from_=str(tiny_model))).status == "success"


async def test_blobs_are_no_models_so_only_a_key_held_to_none_uploads_them(start_door, tiny_model, store,
                                                                        monkeypatch):
    """Uploading a blob (and asking whether the store has one) names no model: a key's model
    patterns cannot admit it, so an admin key held to some models may not, as for a create
    from files; an admin key held to none may, a user key not at all."""
    for name, key in (("ROOT_KEY", "root-key-Blob1"), ("SOME_KEY", "some-key-Blob2"), ("USER_KEY", "user-key-Blob3")):
        monkeypatch.setenv(name, key)
    c = await start_door(keys={"root": {"key": "env:ROOT_KEY", "role": "admin"},
                               "some": {"key": "env:SOME_KEY", "role": "admin", "models": ["tiny*"]},
                               "u": {"key": "env:USER_KEY", "role": "user"}})
    data = b"GGUF, or any bytes at all"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession(c.ollama_url) as s:

        async def upload(key: str) -> tuple[int, str]:
            async with s.post(f"/api/blobs/{digest}", data=data, headers={"Authorization": f"Bearer {key}"}) as r:
                return r.status, (await r.text())

        async def head(key: str) -> int:
            async with s.head(f"/api/blobs/{digest}", headers={"Authorization": f"Bearer {key}"}) as r:
                return r.status

        status, text = await upload("some-key-Blob2")
        assert status == 403 and "held to none" in json.loads(text)["error"]
        assert await head("some-key-Blob2") == 403
        assert (await upload("user-key-Blob3"))[0] == 403 and await head("user-key-Blob3") == 403
        assert not blob(store, digest).exists()
        assert await head("root-key-Blob1") == 404
        assert (await upload("root-key-Blob1"))[0] == 201 and blob(store, digest).read_bytes() == data
        assert await head("root-key-Blob1") == 200
        assert await head("some-key-Blob2") == 403  # there now, and still not its to ask about
    # The official client's upload (what `ollama create` does with a local file), refused the same way.
    some = ollama.AsyncClient(host=c.ollama_url, headers={"Authorization": "Bearer some-key-Blob2"})
    assert "held to none" in await refused(lambda: some.create_blob(tiny_model), 403)


async def test_generate_raw_suffix_and_context(start_door, tmp_path):
    coder = ggufmaker.write_model(tmp_path / "coder.gguf", fim=True)
    c = await start_door(models={"coder": {"path": str(coder)}})
    api = c.api
    opts = {"num_predict": 3, "temperature": 0}
    first = await api.generate(model=MODEL_ID, prompt="hello", options=opts)
    assert first.context and len(first.context) == first.prompt_eval_count + first.eval_count
    raw = await api.generate(model=MODEL_ID, prompt="hello", raw=True, options=opts)
    assert raw.prompt_eval_count < first.prompt_eval_count and raw.context is None  # no template, no context

    # Going on from the context: the earlier prompt and reply come first.
    fresh = await api.generate(model=MODEL_ID, prompt="again", options=opts)
    more = await api.generate(model=MODEL_ID, prompt="again", context=first.context, options=opts)
    assert more.context[:len(first.context)] == first.context
    assert more.prompt_eval_count == len(first.context) + fresh.prompt_eval_count  # (the tiny model adds no BOS)
    parts = [p async for p in await api.generate(model=MODEL_ID, prompt="again", context=first.context,
                                                  options=opts, stream=True)]
    assert parts[-1].done and parts[-1].context == more.context and all(p.context is None for p in parts[:-1])
    assert "context" in await refused(lambda: api.generate(model=MODEL_ID, prompt="x", context=[10 ** 9]), 400)
    assert "context" in await refused(lambda: api.generate(model="up/x", prompt="x", context=[1]), 400)

    # suffix: fill-in-the-middle on a model with FIM tokens; a 400 on one without.
    prefix = await api.generate(model="coder", prompt="def f(", raw=True, options={"num_predict": 1})
    fim = await api.generate(model="coder", prompt="def f(", suffix="return x", options={"num_predict": 2})
    assert fim.done and fim.prompt_eval_count > prefix.prompt_eval_count + 3
    assert "suffix" in await refused(lambda: api.generate(model=MODEL_ID, prompt="a", suffix="b"), 400)
    assert "images" in await refused(lambda: api.generate(model=MODEL_ID, prompt="a", raw=True,
                                                          images=[b"\x89PNG\r\n"]), 400)


async def test_names_with_and_without_latest_are_one_model(start_door):
    c = await start_door()
    for name in (MODEL_ID, f"{MODEL_ID}:latest", f"library/{MODEL_ID}", f"library/{MODEL_ID}:latest", "TINY"):
        r = await c.api.generate(model=name, prompt="hi", options={"num_predict": 1})
        assert r.done and r.model == name
        assert (await c.api.show(name)).details.family == "llama"
        assert (await c.api.embed(model=name, input="hi")).embeddings
    await refused(lambda: c.api.generate(model=f"{MODEL_ID}:7b", prompt="hi"), 404)
    await c.api.chat(model=f"{MODEL_ID}:latest", messages=[])  # an empty chat loads it
    assert [m.model for m in (await c.api.ps()).models] == [MODEL_ID]
    body = {"model": f"library/{MODEL_ID}:latest", "messages": HI, "max_tokens": 1}
    async with aiohttp.ClientSession(c.ollama_url) as s:  # the /v1 doors on the Ollama listener
        async with s.post("/v1/chat/completions", json=body) as r:
            assert r.status == 200
    assert (await c.post("/v1/chat/completions", json=body)).status == 200


async def test_the_stores_models_keep_their_names_with_discovery_on(start_door, registry, store):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    raw = registry.manifests[("library", "tinyllama", "latest")]
    other = store / "manifests" / "otherhost" / "someone" / "coder" / "latest"  # as Ollama keeps one from elsewhere
    other.parent.mkdir(parents=True)
    other.write_bytes(raw)
    d = await start_door(registry, models={"discover": True, "sources": ["ollama"]})
    listed = await names(d.api)
    assert "tinyllama:latest" in listed and f"{registry.host}/library/tinyllama:latest" not in listed
    assert "otherhost/someone/coder:latest" in listed
    assert (await d.api.generate(model="otherhost/someone/coder", prompt="hi", options={"num_predict": 1})).done
    await d.api.delete("otherhost/someone/coder")
    assert not other.exists() and "otherhost/someone/coder:latest" not in await names(d.api)
    manifest = json.loads(raw)
    assert all(blob(store, x["digest"]).is_file() for x in manifest["layers"])  # tinyllama still uses them


def test_templates_render_as_ollama_renders_them():
    from anyad.plugins.ollama_template import TemplateError, compile_template, render

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    # Ollama's ChatML template (with .Messages): the whole conversation at once, ending on the assistant's turn.
    messages = ('{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
                '<|im_start|>{{ .Role }}\n{{ .Content }}{{ if not $last }}<|im_end|>\n{{ end }}\n'
                '{{- if and (ne .Role "assistant") $last }}<|im_end|>\n<|im_start|>assistant\n{{ end }}\n{{- end }}')
    want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello"
            "<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")
    assert render(messages, chat) == want
    # A legacy one (.System, .Prompt, .Response): turn by turn, cut at the last .Response.
    legacy = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n"
              "{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
    assert render(legacy, chat) == want
    assert render('{{ printf "%s=%d" "n" 3 }}{{/* a comment */}} {{- with .System }}[{{ . }}]{{ else }}-{{ end }}',
                  [{"role": "user", "content": "x"}]) == "n=3-"
    for bad in ("{{ if .System }}", "{{ define \"x\" }}{{ end }}", "{{ nosuchfunc .X }}", "{{ .Prompt "):
        with pytest.raises(TemplateError):
            compile_template(bad)


def test_modelfiles_parse_as_ollama_parses_them():
    from anyad.errors import InvalidRequest
    from anyad.plugins.ollama_modelfile import parse

    mf = parse('# comment\nFROM /models/x.gguf\nparameter temperature 0.5\nPARAMETER stop "<|im_end|>"\n'
               'PARAMETER stop <|eot|>\nPARAMETER num_ctx 4096\nSYSTEM """Two\nlines."""\nTEMPLATE "{{ .Prompt }}"\n'
               'MESSAGE user Hi there\nLICENSE MIT\n')
    assert mf.from_ == "/models/x.gguf" and mf.system == "Two\nlines." and mf.template == "{{ .Prompt }}"
    assert mf.parameters == {"temperature": 0.5, "stop": ["<|im_end|>", "<|eot|>"], "num_ctx": 4096}
    assert mf.messages == [{"role": "user", "content": "Hi there"}] and mf.license == ["MIT"]
    for bad, says in (("FROM x\nDANCE now", "unknown command"), ('SYSTEM """open', "not closed"),
                      ("PARAMETER top_k many", "integer"), ("PARAMETER nope 1", "unknown parameter"),
                      ("MESSAGE wizard hi", "role")):
        with pytest.raises(InvalidRequest) as err:
            parse(bad)
        assert says in err.value.message


async def test_an_interrupted_pull_resumes_where_it_stopped(start_door, registry, store):
    model, license_ = json.loads(registry.manifests[("library", "tinyllama", "latest")])["layers"]
    registry.cut.add(model["digest"])
    c = await start_door(registry)
    assert "interrupted" in await refused(lambda: c.api.pull("tinyllama", stream=True), -1)
    part = store / "blobs" / f".{model['digest'].replace(':', '-')}.part"
    have = part.stat().st_size
    assert 0 < have < model["size"]  # kept, hidden, for the next pull
    assert files(store / "manifests") == [] and "tinyllama:latest" not in await names(c.api)
    assert (await c.api.pull("tinyllama")).status == "success"
    assert registry.ranges[-2:] == [(model["digest"], f"bytes={have}-"), (license_["digest"], None)]
    assert not part.exists() and blob(store, model["digest"]).read_bytes() == registry.blobs[model["digest"]]


# -- what a hostile registry, a broken store or a client that goes away cannot do ----------------

def layers_of(registry: FakeOllamaRegistry, model: str) -> list[dict]:
    m = json.loads(registry.manifests[("library", model, "latest")])
    return [m["config"], *m["layers"]]


async def test_a_registry_that_lies_about_a_blobs_size_never_touches_the_stores_copy(start_door, registry, store):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    m = json.loads(registry.manifests[("library", "tinyllama", "latest")])
    model = m["layers"][0]
    weights = blob(store, model["digest"]).read_bytes()
    registry.manifests[("library", "liar", "latest")] = json.dumps(
        {**m, "layers": [{**model, "size": model["size"] + 1}]}).encode()
    error = await refused(lambda: c.api.pull("liar", stream=True), -1)
    assert f"{model['size'] + 1} were expected" in error
    assert blob(store, model["digest"]).read_bytes() == weights  # the verified blob, still there, unchanged
    r = await c.post("/v1/chat/completions", json={"model": "tinyllama", "messages": HI, "max_tokens": 1})
    assert r.status == 200
    # One digest listed twice with two sizes: refused before anything is fetched.
    registry.manifests[("library", "twice", "latest")] = json.dumps(
        {**m, "layers": [model, {**model, "mediaType": FakeOllamaRegistry.MODEL, "size": 3}]}).encode()
    before = len(registry.requests)
    assert "twice" in await refused(lambda: c.api.pull("twice"), 502)
    assert [p for p in registry.requests[before:] if "/blobs/" in p] == []
    assert {x.name for x in files(store / "manifests")} == {"latest"} and "liar:latest" not in await names(c.api)


NESTED = ("{{range .Messages}}{{range $.Messages}}{{range $.Messages}}{{range $.Messages}}{{range $.Messages}}x"
          "{{end}}{{end}}{{end}}{{end}}{{end}}")
TURNS = [{"role": r, "content": "hi"} for r in ("user", "assistant") * 12] + HI  # 25 turns: 25**5 with NESTED


async def test_only_anyads_own_creates_have_their_template_rendered_and_within_bounds(start_door, registry,
                                                                                     tiny_model):
    # A registry's config blob asking for anyad's renderer is not heard: the GGUF's chat template serves it.
    registry.publish("tpl", tiny_model.read_bytes(), template=NESTED,
                     config={"model_format": "gguf", "anyad": {"template": True}})
    c = await start_door(registry)
    await c.api.pull("tpl")
    assert (await c.api.show("tpl")).template != NESTED
    r = await c.post("/v1/chat/completions", json={"model": "tpl", "messages": TURNS, "max_tokens": 1})
    assert r.status == 200
    # Created here with that TEMPLATE, anyad renders it, and stops it at its step budget: a 400, not a hang.
    await c.api.create(model="nested", from_="tpl", template=NESTED)
    assert (await c.api.show("nested")).template == NESTED
    r = await c.post("/v1/chat/completions", json={"model": "nested", "messages": TURNS, "max_tokens": 1})
    assert r.status == 400 and "steps" in (await r.json())["error"]["message"]
    # The daemon after a restart knows which is which (anyad's own record, not the config blob).
    again = await start_door(registry)
    assert (await again.api.show("nested")).template == NESTED and (await again.api.show("tpl")).template != NESTED
    assert (await again.api.generate(model="tpl", prompt="hi", options={"num_predict": 1})).done


async def test_a_rendered_prompt_is_held_to_the_servers_caps(start_door):
    c = await start_door(server={"max_prompt_chars": 1000})
    await c.api.create(model="thrice", from_=MODEL_ID, template="{{ .Prompt }}{{ .Prompt }}{{ .Prompt }}")
    await c.api.create(model="tenfold", from_=MODEL_ID, template="{{ range 10 }}{{ $.Prompt }}{{ end }}")
    assert (await c.api.generate(model="thrice", prompt="a" * 100, options={"num_predict": 1})).done
    # Within the cap as sent; over it as rendered: refused as an over-long request is.
    assert "max_prompt_chars" in await refused(lambda: c.api.generate(model="thrice", prompt="a" * 600), 400)
    # Far over it: the renderer stops at twice the cap, before it is made.
    assert "longer than 2000 characters" in await refused(
        lambda: c.api.generate(model="tenfold", prompt="a" * 900), 400)


def test_templates_are_bounded_and_range_over_an_integer():
    from anyad.plugins.ollama_template import TemplateError, compile_template, render

    one = [{"role": "user", "content": "x"}]
    assert render("{{ range $i := 3 }}[{{ $i }}]{{ end }}{{ range 0 }}x{{ else }}none{{ end }}", one) == "[0][1][2]none"
    with pytest.raises(TemplateError, match="steps"):
        render("{{ range 1000000000000 }}x{{ end }}", one)  # counted as it goes, never made whole
    with pytest.raises(TemplateError, match="steps"):
        render(NESTED, TURNS)
    with pytest.raises(TemplateError, match="more text"):  # a value that doubles each turn
        render('{{ $x := "ab" }}{{ range 40 }}{{ $x = print $x $x }}{{ end }}{{ len $x }}', one, max_chars=10000)
    for deep in ("{{" + "(" * 3000 + "1" + ")" * 3000 + "}}", "{{ if 1 }}" * 500 + "{{ end }}" * 500):
        with pytest.raises(TemplateError, match="nests"):
            compile_template(deep)


async def test_a_pulled_models_parameters_are_held_to_what_a_create_takes(start_door, registry, store, tiny_model):
    gguf = tiny_model.read_bytes()
    bad = {"hot": ({"temperature": 50}, "temperature"), "negative": ({"top_k": -7}, "top_k"),
           "stops": ({"stop": [""] * 40}, "stop"), "seedy": ({"seed": 2 ** 70}, "seed"),
           "small": ({"num_ctx": 1}, "num_ctx")}
    for model, (params, _) in bad.items():
        registry.publish(model, gguf, params=json.dumps(params))
    c = await start_door(registry)
    for model, (_, says) in bad.items():
        error = await refused(lambda model=model: c.api.pull(model), 400)
        assert says in error and "nothing was written" in error, error
    assert files(store) == []  # not one blob of them left behind
    assert not set(bad) & {n.split(":")[0] for n in await names(c.api)}

    # A manifest already in the store (Ollama's, an older anyad's) with a PARAMETER a create would
    # refuse: served without that one.
    await c.api.pull("tinyllama")
    params = json.dumps({"temperature": 50, "seed": 2 ** 70, "num_predict": 2}).encode()
    digest = "sha256:" + hashlib.sha256(params).hexdigest()
    blob(store, digest).write_bytes(params)
    m = json.loads(registry.manifests[("library", "tinyllama", "latest")])
    m["layers"].append({"mediaType": "application/vnd.ollama.image.params", "digest": digest, "size": len(params)})
    warm = store / "manifests" / registry.host / "library" / "warm" / "latest"
    warm.parent.mkdir(parents=True)
    warm.write_bytes(json.dumps(m).encode())
    # And one that cannot be served at all (its model layer is no GGUF): not listed, but deletable.
    junk = b"not a model at all"
    junk_digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    blob(store, junk_digest).write_bytes(junk)
    broken = store / "manifests" / registry.host / "library" / "broken" / "latest"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(json.dumps({**m, "layers": [{"mediaType": FakeOllamaRegistry.MODEL, "digest": junk_digest,
                                                    "size": len(junk)}]}).encode())
    again = await start_door(registry)
    r = await again.api.generate(model="warm", prompt="hi")
    assert r.done and 0 < r.eval_count <= 2  # its num_predict kept
    shown = (await again.api.show("warm")).parameters
    assert "num_predict" in shown and "temperature" not in shown and "seed" not in shown
    assert "broken:latest" not in await names(again.api)
    await again.api.delete("broken")
    assert not broken.exists() and not blob(store, junk_digest).exists()
    assert "model 'broken' not found" in await refused(lambda: again.api.delete("broken"), 404)


async def test_delete_keeps_every_blob_while_a_manifest_cannot_be_read(start_door, registry, store):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    await c.api.copy("tinyllama", "alias")
    raw = registry.manifests[("library", "tinyllama", "latest")]
    blobs = [blob(store, x["digest"]) for x in layers_of(registry, "tinyllama")]
    other = store / "manifests" / "registry.ollama.ai" / "library" / "other" / "latest"  # Ollama's, being written
    other.parent.mkdir(parents=True)
    other.write_bytes(raw[: len(raw) // 2])
    await c.api.delete("tinyllama")
    assert all(p.is_file() for p in blobs)
    other.unlink()
    stray = other.parent / ".latest.tmp-1234"  # a file no model's name is (a writer's temporary one)
    stray.write_bytes(raw)
    await c.api.delete("alias")
    assert all(p.is_file() for p in blobs)
    assert "alias:latest" not in await names(c.api)


async def test_a_manifest_that_arrives_in_pieces_is_read_whole(start_door, registry, tiny_model):
    registry.publish("padded", tiny_model.read_bytes(), pad=600_000)  # more than one read of the socket
    c = await start_door(registry)
    assert (await c.api.pull("padded")).status == "success"
    assert "padded:latest" in await names(c.api)


async def test_a_name_in_a_providers_namespace_is_refused(start_door, tiny_model, store):
    c = await start_door(providers={"up": {"base_url": "http://127.0.0.1:9/v1", "models": ["gpt-x"]}})
    for name in ("up/gpt-x", "UP/other:7b"):
        error = await refused(lambda name=name: c.api.create(model=name, from_=str(tiny_model)), 400)
        assert "provider 'up'" in error
    assert files(store) == [] and await names(c.api) == [MODEL_ID, "up/gpt-x"]


async def test_blob_redirects_go_only_where_anyad_allows(start_door, registry, store, aiohttp_server):
    hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"the internal service's private bytes")

    app = web.Application()
    app.router.add_get("/{path:.*}", internal)
    elsewhere = await aiohttp_server(app)
    model = layers_of(registry, "tinyllama")[1]["digest"]
    c = await start_door(registry)
    registry.redirect[model] = f"http://127.0.0.1:{elsewhere.port}/admin/secrets"  # plain http, another host
    error = await refused(lambda: c.api.pull("tinyllama"), 502)
    assert "redirect" in error and hits == []
    assert files(store / "manifests") == [] and not blob(store, model).exists()
    # Another of the registry's own paths: followed. What it sends is held to the digest, and a
    # mismatch says nothing of what came (not its hash).
    registry.redirect[model] = f"/storage/{model}"
    registry.corrupt.add(model)
    error = await refused(lambda: c.api.pull("tinyllama"), 502)
    bad = registry.blobs[model][:-1] + bytes([registry.blobs[model][-1] ^ 0xFF])
    assert "SHA-256 mismatch" in error and hashlib.sha256(bad).hexdigest() not in error
    registry.corrupt.clear()
    assert (await c.api.pull("tinyllama")).status == "success"
    # A public registry may not send anyad into the local network, by address or by name.
    origin = URL("https://registry.example/v2/library/m/blobs/sha256:00")
    guard = download._Guard(origin)
    for target in ("https://10.1.2.3/blob", "https://127.0.0.1:8080/blob", "https://[::1]/blob",
                   "http://cdn.example/blob"):
        with pytest.raises(download.RedirectRefused):
            download._follow(origin, target, origin, guard)
    assert download._follow(origin, "https://cdn.example/blob", origin, guard).host == "cdn.example"
    with pytest.raises(download.RedirectRefused, match="resolves to a loopback"):
        await guard.resolve("localhost", 443)


async def test_a_name_written_again_leaves_no_blob_only_its_old_manifest_used(start_door, registry, store,
                                                                               tiny_model):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    old = {x["digest"] for x in layers_of(registry, "tinyllama")}
    registry.publish("tinyllama", tiny_model.read_bytes(), license="MIT, the second version")
    await c.api.pull("tinyllama")  # pulled again, changed
    new = {x["digest"] for x in layers_of(registry, "tinyllama")}
    assert all(blob(store, d).is_file() for d in new) and not any(blob(store, d).exists() for d in old - new)

    def text_blob(text: str) -> Path:
        return blob(store, "sha256:" + hashlib.sha256(text.encode()).hexdigest())

    await c.api.create(model="pirate", from_=str(tiny_model), system="Arr.")
    await c.api.create(model="pirate", from_=str(tiny_model), system="Yo ho.")  # created again
    assert not text_blob("Arr.").exists() and text_blob("Yo ho.").is_file()
    await c.api.copy("tinyllama", "pirate")  # copied over
    assert not text_blob("Yo ho.").exists()
    manifests = {p.read_bytes() for p in files(store / "manifests")}
    kept = {blob_name(x["digest"]) for raw in manifests for x in [json.loads(raw)["config"],
                                                                   *json.loads(raw)["layers"]]}
    assert {p.name for p in files(store / "blobs")} == kept  # nothing but what the manifests use
    assert (await c.api.generate(model="pirate", prompt="hi", options={"num_predict": 1})).done


async def test_a_create_whose_client_goes_away_stops_its_copy_and_leaves_nothing(start_door, tiny_model, store,
                                                                                  monkeypatch):
    monkeypatch.setattr(ollama_store, "CHUNK", 4096)  # the tiny model in some fifty blocks
    monkeypatch.setattr(ollama_models, "PROGRESS_EVERY_S", 0.0)  # a progress line for each
    step, arrived = threading.Semaphore(0), threading.Semaphore(0)
    cancels: list[threading.Event] = []
    real = OllamaStore.import_file

    def paced(self, src, progress=None, cancel=None):  # the copy, a block at a time as the test lets it
        cancels.append(cancel)

        def each(done: int, total: int) -> None:
            progress(done, total)
            arrived.release()
            step.acquire(timeout=30)

        return real(self, src, each, cancel)

    monkeypatch.setattr(OllamaStore, "import_file", paced)
    c = await start_door()
    door = ollama_models.DOORS[c.daemon]
    async with aiohttp.ClientSession(c.ollama_url) as s:
        resp = await s.post("/api/create", json={"model": "big", "from": str(tiny_model)})
        assert resp.status == 200 and "copying file" in (await resp.content.readline()).decode()
        assert await asyncio.to_thread(arrived.acquire, True, 30)  # the copy has begun
        resp.close()  # the client goes away
    for _ in range(100):  # the create notices at its next line; its copy stops at its next block
        if cancels[0].is_set():
            break
        step.release()
        if not await asyncio.to_thread(arrived.acquire, True, 30):
            break
    assert cancels[0].is_set()
    step.release(1000)
    async with door.lock:  # the create is over once it lets go of the store
        pass
    assert files(store) == [] and "big:latest" not in await names(c.api)


async def test_a_create_that_fails_after_its_copy_leaves_no_blob(start_door, tiny_model, tmp_path, store):
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(tiny_model.read_bytes())
    c = await start_door(models={"victim": {"path": str(victim)}})
    victim.write_bytes(b"GGUF, or so it starts")  # changed on disk since anyad read it
    assert "not a GGUF" in await refused(lambda: c.api.create(model="made", from_="victim"), 400)
    assert files(store) == [] and "made:latest" not in await names(c.api)


async def test_what_anyad_writes_in_the_store_is_readable_as_the_umask_allows(start_door, registry, store, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    other = ggufmaker.write_model(tmp_path / "other.gguf", fim=True)
    await c.api.create(model="made", from_=str(other), system="Hi.")
    digest = await c.api.create_blob(ggufmaker.write_model(tmp_path / "third.gguf", seed=3))
    assert blob(store, digest).is_file()
    written = files(store)
    assert len(written) >= 8
    assert {p.relative_to(store).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == \
        {p.relative_to(store).as_posix(): oct(0o666 & ~mask) for p in written}


async def test_a_store_that_is_not_as_expected_is_a_409_not_a_500(start_door, registry, store):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    license_ = [x for x in layers_of(registry, "tinyllama") if x["mediaType"].endswith("license")][0]
    blob(store, license_["digest"]).unlink()
    async with aiohttp.ClientSession(c.ollama_url) as s:
        async with s.post("/api/copy", json={"source": "tinyllama", "destination": "cp"}) as r:
            body = await r.json()
            assert r.status == 409 and license_["digest"] in body["error"] and "not in the store" in body["error"]
        for fields, says in (({"path": "/etc/Modelfile"}, "path"),
                             ({"template": "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"}, "nests")):
            async with s.post("/api/create", json={"model": "c", "from": MODEL_ID, "stream": False, **fields}) as r:
                assert r.status == 400 and says in (await r.json())["error"]
        async with s.head("/api/blobs/sha256:" + "a" * 64 + "%0A") as r:  # a digest and a newline: not a digest
            assert r.status == 400
    with pytest.raises(StoreError):
        blob_name("sha256:" + "a" * 64 + "\n")
    assert "cp:latest" not in await names(c.api)


def test_a_registry_whose_host_cannot_name_a_model_is_refused_in_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="IPv6"):
        ollama_plugin.OllamaSettings.model_validate({"registry": "http://[::1]:5000"})
    assert ollama_plugin.OllamaSettings.model_validate({"registry": "http://127.0.0.1:5000/"}).registry == \
        "http://127.0.0.1:5000"


async def test_deleting_a_busy_model_lets_it_finish_then_forgets_it(start_door, tiny_model):
    c = await start_door()
    await c.api.create(model="busy", from_=str(tiny_model))
    sched, backend = c.daemon.scheduler, c.daemon.local["busy:latest"]
    async with sched.use("busy:latest"):  # a request in flight holds it, loaded
        await c.api.delete("busy")
        assert "busy:latest" not in await names(c.api) and backend.loaded
    await asyncio.gather(*list(sched._tasks))  # its deferred unload, now it is idle
    assert sched.view("busy:latest") is None and not backend.loaded
    assert (await c.api.ps()).models == []
    await c.api.create(model="busy", from_=str(tiny_model))  # the name again: a model of its own
    assert (await c.api.generate(model="busy", prompt="hi", options={"num_predict": 1})).done


async def test_what_is_begun_under_the_stores_lock_ends_under_it(start_door, registry):
    c = await start_door(registry)
    await c.api.pull("tinyllama")
    door = ollama_models.DOORS[c.daemon]
    entered, gate = asyncio.Event(), asyncio.Event()
    serve = door.serve

    async def slow_serve(name, path):
        entered.set()
        await gate.wait()
        return await serve(name, path)

    door.serve = slow_serve
    raw = door.models["tinyllama:latest"].manifest.raw

    async def copy() -> None:  # as /api/copy does, its client going away halfway
        async with door.lock:
            await door.commit(parse_name("alias", door.host), raw)

    seen: list[bool] = []
    trying = asyncio.Event()

    async def next_one() -> None:  # the next operation on the store
        trying.set()
        async with door.lock:
            seen.append("alias:latest" in door.models)

    task = asyncio.create_task(copy())
    await asyncio.wait([task, asyncio.ensure_future(entered.wait())], return_when=asyncio.FIRST_COMPLETED)
    assert entered.is_set() and not task.done()
    task.cancel()
    waiting = asyncio.create_task(next_one())
    await trying.wait()  # (the cancelled copy has had its turn: had it let go of the lock, this one ran)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await waiting
    door.serve = serve
    assert seen == [True]  # the next one ran only once the model was served
    assert "alias:latest" in await names(c.api)
