"""`anyad pull` against a local aiohttp file server: resume after an interruption, hashes
(given and published by the hub), a 404, a disk too small, the CLI's progress, names that
would land outside --dir, and downloads that are not GGUF files."""

from __future__ import annotations

import asyncio
import hashlib
import os
from urllib.parse import quote

import pytest
from aiohttp import web

from anyad.download import DownloadError, pull
from conftest import anyad_cmd, clean_env


@pytest.fixture
async def server(aiohttp_server, tiny_model):
    data = tiny_model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    state = {"ranges": [], "cut": False, "published": sha}

    async def whole(request: web.Request) -> web.StreamResponse:
        state["ranges"].append(request.headers.get("Range"))
        if state["cut"]:  # send half, then drop the connection
            resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()
            return resp
        return web.FileResponse(tiny_model)  # answers Range requests with 206

    async def hub(request: web.Request) -> web.Response:
        # As the hub does: a redirect to the storage, carrying the LFS file's hash.
        raise web.HTTPFound("/blobs/tiny", headers={"X-Linked-Etag": f'"{state["published"]}"',
                                                      "X-Linked-Size": str(len(data))})

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"", headers={"Content-Length": str(1 << 60)})

    async def page(request: web.Request) -> web.Response:
        return web.json_response({"error": "log in to download this file"})

    async def big_page(request: web.Request) -> web.StreamResponse:
        # An HTML page far bigger than a client that stops at its first bytes would read.
        block = b"<html>" + b" " * ((1 << 20) - 6)
        resp = web.StreamResponse(headers={"Content-Type": "text/html", "Content-Length": str(BIG_PAGE)})
        await resp.prepare(request)
        try:
            while state["page_sent"] < BIG_PAGE:
                await resp.write(block)
                state["page_sent"] += len(block)
        except (ConnectionError, OSError):
            pass  # the client hung up
        finally:
            state["page_done"].set()
        return resp

    async def elsewhere(request: web.Request) -> web.Response:
        # A redirect and a Content-Disposition that both name a file outside --dir.
        raise web.HTTPFound("/any/..%2F..%2Fredirected.gguf",
                            headers={"Content-Disposition": 'attachment; filename="../../disposed.gguf"'})

    app = web.Application()
    app.router.add_get("/files/tiny.gguf", whole)
    app.router.add_get("/blobs/tiny", whole)
    app.router.add_get("/org/repo/resolve/main/tiny.gguf", hub)
    app.router.add_get("/files/huge.gguf", huge)
    app.router.add_get("/files/page.gguf", page)
    app.router.add_get("/files/big.gguf", big_page)
    app.router.add_get("/files/moved.gguf", elsewhere)
    # Any name at all gets the model: a client that trusted the name would save it there.
    app.router.add_get("/any/{name:.*}", whole)
    app.router.add_get("/org/repo/resolve/main/{name:.*}", whole)
    state["page_sent"], state["page_done"] = 0, asyncio.Event()
    srv = await aiohttp_server(app)
    state["base"] = f"http://127.0.0.1:{srv.port}"
    state["sha"] = sha
    state["data"] = data
    return state


BIG_PAGE = 64 << 20


async def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    url = server["base"] + "/files/tiny.gguf"
    server["cut"] = True
    with pytest.raises(DownloadError, match="interrupted .* run the same command again to resume"):
        await pull(url, tmp_path, sha256=server["sha"])
    part = tmp_path / ".tiny.gguf.part"
    kept = part.stat().st_size
    assert 0 < kept < len(server["data"]) and not (tmp_path / "tiny.gguf").exists()
    server["cut"] = False
    path = await pull(url, tmp_path, sha256=server["sha"])
    assert server["ranges"][-1] == f"bytes={kept}-"
    assert path.read_bytes() == server["data"] and not part.exists()


async def test_a_wrong_hash_keeps_nothing(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        await pull(server["base"] + "/files/tiny.gguf", tmp_path, sha256="0" * 64)
    assert "0" * 64 in str(err.value) and server["sha"] in str(err.value)  # both hashes
    assert list(tmp_path.iterdir()) == []


async def test_hf_sources_use_the_hubs_published_hash(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server["base"])
    path = await pull("hf:org/repo/tiny.gguf", tmp_path)
    assert path.name == "tiny.gguf" and hashlib.sha256(path.read_bytes()).hexdigest() == server["sha"]
    path.unlink()
    server["published"] = "f" * 64  # the hub says otherwise: refused
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        await pull("hf:org/repo/tiny.gguf", tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_clear_errors_for_404_and_a_full_disk(server, tmp_path):
    with pytest.raises(DownloadError, match=r"not found \(404\)"):
        await pull(server["base"] + "/files/nope.gguf", tmp_path)
    with pytest.raises(DownloadError, match="not enough disk space .* needs .* more"):
        await pull(server["base"] + "/files/huge.gguf", tmp_path)
    with pytest.raises(DownloadError, match="hf:ORG/REPO/FILE.gguf"):
        await pull("hf:just-org", tmp_path)


async def test_the_cli_shows_progress_and_says_where_it_saved(server, tmp_path):
    env = clean_env(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *anyad_cmd("pull", server["base"] + "/files/tiny.gguf", "--sha256", server["sha"], "--dir", str(tmp_path / "m")),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "100.0 %" in err.decode() and "/s" in err.decode()
    assert f"saved {tmp_path / 'm' / 'tiny.gguf'}" in out.decode()
    proc = await asyncio.create_subprocess_exec(*anyad_cmd("pull", server["base"] + "/files/nope.gguf",
                                                           "--dir", str(tmp_path / "m")),
                                                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "not found (404)" in err.decode() and "Traceback" not in err.decode()
    assert os.listdir(tmp_path / "m") == ["tiny.gguf"]


def written(root) -> list[str]:
    """Every file under ``root``, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("name", [
    "..%2F..%2Fescaped.gguf",  # a slash, encoded
    "%2E%2E%2F%2E%2E%2Fescaped.gguf",  # the dots too
    "%2E%2E",
    "..%5C..%5Cescaped.gguf",  # a backslash
    "tiny%00.gguf",  # NUL
    "tiny%0A.gguf",  # a newline
    "%1B%5B31mtiny.gguf",  # a terminal escape
    "tiny%E2%80%AE.gguf",  # right-to-left override
])
@pytest.mark.parametrize("form", ["url", "hf"])
async def test_a_name_that_is_not_a_plain_file_name_is_refused_and_nothing_is_written(server, tmp_path, monkeypatch,
                                                                                      name, form):
    monkeypatch.setenv("HF_ENDPOINT", server["base"])
    dest = tmp_path / "a" / "b"
    source = f"hf:org/repo/{name}" if form == "hf" else f"{server['base']}/any/{name}"
    with pytest.raises(DownloadError, match="not a plain file name"):
        await pull(source, dest)
    assert written(tmp_path) == [] and not (tmp_path / "escaped.gguf").exists()


async def test_an_absolute_path_in_the_name_is_refused(server, tmp_path):
    target = tmp_path / "outside.gguf"
    with pytest.raises(DownloadError, match="not a plain file name"):
        await pull(f"{server['base']}/any/{quote(str(target), safe='')}", tmp_path / "models")
    assert not target.exists() and written(tmp_path) == []


async def test_the_name_is_the_one_asked_for_not_a_redirects_or_a_headers(server, tmp_path):
    dest = tmp_path / "a" / "b"
    path = await pull(server["base"] + "/files/moved.gguf", dest, sha256=server["sha"])
    assert path == dest / "moved.gguf" and written(tmp_path) == ["a/b/moved.gguf"]


async def test_a_page_that_is_not_gguf_is_refused_and_nothing_is_kept(server, tmp_path):
    with pytest.raises(DownloadError, match=r"""is not a GGUF file \(it starts with b'\{"er', .*application/json"""):
        await pull(server["base"] + "/files/page.gguf", tmp_path)
    assert written(tmp_path) == []


async def test_a_big_web_page_is_refused_at_its_first_bytes(server, tmp_path):
    with pytest.raises(DownloadError, match="not a GGUF file .*text/html"):
        await pull(server["base"] + "/files/big.gguf", tmp_path)
    assert written(tmp_path) == []
    await server["page_done"].wait()  # the server notices the hang-up, or sends it all
    assert server["page_sent"] < BIG_PAGE


async def test_a_part_left_that_is_not_gguf_is_started_again(server, tmp_path):
    (tmp_path / ".tiny.gguf.part").write_bytes(b"<html>")
    path = await pull(server["base"] + "/files/tiny.gguf", tmp_path, sha256=server["sha"])
    assert path.read_bytes() == server["data"] and server["ranges"][-1] is None


async def test_the_cli_refuses_with_one_line_and_keeps_nothing(server, tmp_path):
    env = clean_env(tmp_path)
    for source in (server["base"] + "/any/..%2F..%2Fescaped.gguf", server["base"] + "/files/page.gguf"):
        proc = await asyncio.create_subprocess_exec(*anyad_cmd("pull", source, "--dir", str(tmp_path / "m")), env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 1 and out == b"", err
        assert len(err.decode().splitlines()) == 1 and err.startswith(b"anyad: "), err
    assert written(tmp_path) == []


@pytest.mark.parametrize("name", [".hidden.gguf", ".x.gguf.part", "trailing.gguf ", "dot.gguf.", "a" * 300 + ".gguf"])
async def test_hidden_padded_and_overlong_names_are_refused(server, tmp_path, name):
    with pytest.raises(DownloadError, match="nothing was written"):
        await pull(f"{server['base']}/any/{quote(name)}", tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


async def test_a_kept_part_is_renamed_into_place_only_when_the_server_vouches_for_it(aiohttp_server, tiny_model,
                                                                                   tmp_path):
    data = tiny_model.read_bytes()
    seen: list[str | None] = []

    async def ranges(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Range"))
        if request.headers.get("Range") and len(seen) == 1:
            # "Not satisfiable" for a file of another size: the part is not this file.
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        if request.headers.get("Range"):
            return web.Response(status=206, body=b"GGUFjunk", headers={"Content-Range": "bytes 0-7/8"})
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/m/tiny.gguf", ranges)
    srv = await aiohttp_server(app)
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / ".tiny.gguf.part").write_bytes(b"GGUF" + os.urandom(len(data) + 1000))
    path = await pull(f"http://127.0.0.1:{srv.port}/m/tiny.gguf", dl)
    assert path.read_bytes() == data  # the bogus part was thrown away and the file fetched whole
    assert seen == [f"bytes={len(data) + 1004}-", None]
    # A 206 that is not the rest of the part (wrong Content-Range) is not appended to it.
    path.unlink()
    (dl / ".tiny.gguf.part").write_bytes(data[:100])
    seen.clear()
    seen.append("skip-the-416")
    path = await pull(f"http://127.0.0.1:{srv.port}/m/tiny.gguf", dl)
    assert path.read_bytes() == data
