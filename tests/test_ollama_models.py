"""The Ollama door's model store, driven by the official `ollama` client: pull (with its
progress) from a fake Ollama-style registry on loopback, copy, delete, create (from a GGUF
path, a model, uploaded blobs, a Modelfile; SYSTEM, PARAMETERs and TEMPLATE applied), and
the chat on what they made; Ollama's names; raw, suffix and context on generate. Digests
that do not match, hostile names and keys that are not an admin's are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import ollama
import pytest

import ggufmaker
from anyad.config import parse_settings
from anyad.plugins import ollama as ollama_plugin
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
