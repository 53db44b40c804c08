"""Chat history in a real SQLite file: what is recorded, the history API, and safety."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request

import psutil
import pytest

from anyad.config import parse_settings
from anyad.store import Exchange, Store
from anyad.store.migrations import MIGRATIONS
from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, make_settings, wait_http
from eventually import until

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]


async def chat(c, messages=MSGS, conv=None, **fields):
    headers = {"X-Anyad-Conversation-Id": conv} if conv else {}
    r = await c.post("/v1/chat/completions", headers=headers,
                     json={"model": MODEL_ID, "messages": messages, "max_tokens": 4, "temperature": 0, **fields})
    return r, await r.json()


async def flushed(c):
    await asyncio.to_thread(c.daemon.store.flush)


async def conversation(c, cid):
    await flushed(c)
    r = await c.get(f"/api/conversations/{cid}")
    assert r.status == 200
    return await r.json()


async def test_an_exchange_is_recorded_whole(client):
    r, body = await chat(client)
    assert r.status == 200
    cid = r.headers["X-Anyad-Conversation-Id"]
    conv = await conversation(client, cid)
    reply = body["choices"][0]["message"]["content"]
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("system", "You are terse."), ("user", "Name a fruit."), ("assistant", reply)]
    assert conv["title"] == "Name a fruit." and conv["model"] == MODEL_ID
    (ex,) = conv["exchanges"]
    assert ex["model"] == MODEL_ID and ex["backend"] == MODEL_ID and ex["stream"] == 0
    assert ex["finish_reason"] == "length" and ex["request_id"] == r.headers["X-Request-Id"]
    assert (ex["prompt_tokens"], ex["completion_tokens"]) == (body["usage"]["prompt_tokens"], 4)
    assert 0 < ex["ttft_ms"] <= ex["latency_ms"] and ex["started"] <= ex["finished"]


async def test_a_continued_conversation_stores_each_message_once(client):
    r1, b1 = await chat(client)
    cid = r1.headers["X-Anyad-Conversation-Id"]
    a1 = b1["choices"][0]["message"]["content"]
    follow = [*MSGS, {"role": "assistant", "content": a1}, {"role": "user", "content": "Another."}]
    r2, b2 = await chat(client, follow, conv=cid, stream=False)
    assert r2.headers["X-Anyad-Conversation-Id"] == cid
    conv = await conversation(client, cid)
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["seq"] for m in conv["messages"]] == [0, 1, 2, 3, 4]
    assert conv["messages"][4]["content"] == b2["choices"][0]["message"]["content"]
    assert conv["messages"][2]["exchange_id"] == conv["exchanges"][0]["id"]
    assert conv["messages"][4]["exchange_id"] == conv["exchanges"][1]["id"]
    assert conv["messages"] and len(conv["exchanges"]) == 2
    # A client-chosen id starts a conversation of that name.
    r3, _ = await chat(client, conv="my-chat-1")
    assert r3.headers["X-Anyad-Conversation-Id"] == "my-chat-1"
    assert (await conversation(client, "my-chat-1"))["messages"][1]["content"] == "Name a fruit."


async def test_an_abandoned_stream_is_recorded_up_to_where_it_stopped(client):
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 1900,
                                                       "stream": True, "temperature": 0})
    cid = r.headers["X-Anyad-Conversation-Id"]
    got = ""
    while len(got) < 20:
        line = await r.content.readline()
        if line.startswith(b"data: {"):
            got += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    r.close()  # the client hangs up
    async def listed() -> bool:
        await flushed(client)
        return (await (await client.get("/api/conversations")).json())["total"] > 0

    await until(listed, what="the cancelled exchange in the history")
    conv = await conversation(client, cid)
    (ex,) = conv["exchanges"]
    assert ex["finish_reason"] == "cancelled" and ex["stream"] == 1
    text = conv["messages"][-1]["content"]
    assert text.startswith(got) and 20 <= len(text) < 1900


async def test_list_is_paged_newest_first_and_searchable(client):
    ids = []
    for word in ("apple", "banana", "cherry"):
        r, _ = await chat(client, [{"role": "user", "content": f"I like {word} pie"}])
        ids.append(r.headers["X-Anyad-Conversation-Id"])
    await flushed(client)
    page = await (await client.get("/api/conversations")).json()
    assert page["total"] == 3 and [c["id"] for c in page["data"]] == ids[::-1]
    page = await (await client.get("/api/conversations?limit=2&offset=1")).json()
    assert [c["id"] for c in page["data"]] == ids[1::-1]
    page = await (await client.get("/api/conversations", params={"q": "banana"})).json()
    assert [c["id"] for c in page["data"]] == [ids[1]]
    page = await (await client.get("/api/conversations", params={"q": "like pie"})).json()
    assert page["total"] == 3
    for hostile in ['"', "banana\"", "AND OR NOT", "a*", "NEAR(apple", "'; DROP TABLE messages; --", "x" * 1000,
                    "content:apple", "{apple}", "^", "\x00", "🍌"]:
        r = await client.get("/api/conversations", params={"q": hostile})
        assert r.status == 200, hostile
        assert isinstance((await r.json())["data"], list)
    for bad, param in (({"q": "x" * 1001}, "q"), ({"limit": "0"}, "limit"), ({"limit": "many"}, "limit"),
                       ({"offset": "-1"}, "offset")):
        r = await client.get("/api/conversations", params=bad)
        assert r.status == 400 and (await r.json())["error"]["param"] == param
    assert (await (await client.get("/api/conversations")).json())["total"] == 3  # nothing was dropped
    # The search index (filled in the background, and before each search) stays whole through deletes.
    await client.delete(f"/api/conversations/{ids[0]}")
    assert (await (await client.get("/api/conversations", params={"q": "apple"})).json())["total"] == 0
    await chat(client, [{"role": "user", "content": "apple again"}])
    assert (await (await client.get("/api/conversations", params={"q": "apple"})).json())["total"] == 1
    conn = sqlite3.connect(client.daemon.store.path)
    conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")


async def test_unknown_and_bad_ids_are_404_and_delete_works(client):
    for path in ("/api/conversations/nope", "/api/conversations/" + "x" * 300, "/api/conversations/a%20b"):
        r = await client.get(path)
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r, _ = await chat(client)
    cid = r.headers["X-Anyad-Conversation-Id"]
    await flushed(client)
    assert (await client.delete(f"/api/conversations/{cid}")).status == 204
    assert (await client.get(f"/api/conversations/{cid}")).status == 404
    assert (await client.delete(f"/api/conversations/{cid}")).status == 404
    conn = sqlite3.connect(client.daemon.store.path)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # its messages went with it
    r = await client.post("/v1/chat/completions", headers={"X-Anyad-Conversation-Id": "no spaces!"},
                          json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    assert r.status == 400 and (await r.json())["error"]["param"] == "X-Anyad-Conversation-Id"


async def test_fifty_concurrent_chats_are_all_recorded(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, max_queue=64))
    results = await asyncio.gather(*(chat(c, [{"role": "user", "content": f"question {i}"}], max_tokens=2)
                                     for i in range(50)))
    assert all(r.status == 200 for r, _ in results)
    ids = {r.headers["X-Anyad-Conversation-Id"] for r, _ in results}
    await flushed(c)
    conn = sqlite3.connect(c.daemon.store.path)
    assert {row[0] for row in conn.execute("SELECT id FROM conversations")} == ids
    assert conn.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 50
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 100
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_history_can_be_turned_off(make_client, tiny_model, tmp_path):
    s = parse_settings({"data_dir": str(tmp_path / "data"), "history": {"enabled": False},
                        "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    r, _ = await chat(c)
    assert r.status == 200 and "X-Anyad-Conversation-Id" not in r.headers
    r = await c.get("/api/conversations")
    assert r.status == 404 and "disabled" in (await r.json())["error"]["message"]
    await asyncio.to_thread(c.daemon.store.flush)
    conn = sqlite3.connect(tmp_path / "data" / "anyad.db")  # there for the cache only
    assert conn.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 0
    # With the cache, the audit and the usage off too, there is no database at all.
    s = parse_settings({"data_dir": str(tmp_path / "data2"), "history": {"enabled": False},
                        "cache": {"enabled": False}, "audit": {"enabled": False}, "usage": {"enabled": False},
                        "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    assert (await chat(c))[0].status == 200 and not (tmp_path / "data2").exists()


def exchange(cid: str, text: str = "hello", started: float | None = None) -> Exchange:
    return Exchange(conversation_id=cid, request_id="r", model="m", backend="m", stream=False, cache=None,
                    messages=[{"role": "user", "content": text}], reply={"role": "assistant", "content": "hi"},
                    finish_reason="stop", prompt_tokens=1, completion_tokens=1, started=started or time.time(),
                    latency_ms=1.0, ttft_ms=1.0)


def test_database_setup_migrations_and_shutdown_drain(tmp_path):
    path = tmp_path / "anyad.db"
    store = Store(path, batch_interval_s=5.0)  # a long batch: close must still write it
    store.record(exchange("a"))
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = [m.__name__ for m in MIGRATIONS]
    assert [r[0] for r in conn.execute("SELECT name FROM _migrations")] == names
    assert conn.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 1
    again = Store(path)  # opening again applies nothing twice
    assert [r[0] for r in sqlite3.connect(path).execute("SELECT name FROM _migrations")] == names
    again.close()


def test_a_writer_that_dies_is_replaced_and_a_job_that_cannot_travel_fails_its_caller(tmp_path):
    """The store's writer is a process: killed, another takes its place (what it had not
    committed is lost, as on a kill -9 of the daemon; what comes after is written), and the
    jobs that waited on it fail instead of hanging. A job must be a module's function."""
    store = Store(tmp_path / "anyad.db")
    try:
        store.record(exchange("before"))
        store.flush()
        first = psutil.Process(store._proc.pid)
        first.kill()
        first.wait(10)
        for _ in range(500):  # the results thread notices the end of its pipe
            if store._proc.pid != first.pid:
                break
            time.sleep(0.01)
        assert store._proc.pid != first.pid
        store.record(exchange("after"))
        store.flush()
        assert {c["id"] for c in store.conversations()["data"]} == {"before", "after"}
        with pytest.raises(Exception, match="pickle"):
            store.submit(lambda db: None)
        store.flush()  # and the store goes on
    finally:
        store.close()
    assert not psutil.pid_exists(store._proc.pid) or psutil.Process(store._proc.pid).status() == "zombie"


def test_retention_by_age_and_by_count(tmp_path):
    store = Store(tmp_path / "anyad.db")
    for i in range(5):
        store.record(exchange(f"c{i}"))
    store.flush()
    old = time.time() - 10 * 86400
    with sqlite3.connect(store.path) as conn:  # beside the writer, as WAL allows
        conn.execute("UPDATE conversations SET updated = ? WHERE id IN ('c0', 'c1')", (old,))
    assert store.apply_retention(7, 0).result() == 2
    assert store.apply_retention(0, 2).result() == 1
    assert [c["id"] for c in store.conversations()["data"]] == ["c4", "c3"]
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 4  # cascaded with their conversations
    store.close()


def test_kill_9_mid_load_keeps_the_database_whole_and_every_finished_reply(tiny_model, tmp_path):
    """``anyad serve`` is killed with SIGKILL while chats are in flight: the file passes
    integrity_check, and every reply that finished 200 ms (a write-batch interval at most)
    before the kill is in the history."""
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{data}"\n[models.{MODEL_ID}]\npath = "{tiny_model}"\nmax_queue = 64\n')
    proc = subprocess.Popen(anyad_cmd("serve", "--config", str(cfg), "--port", str(port)), env=clean_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished: list[tuple[float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        while not stop.is_set():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                data=json.dumps({"model": MODEL_ID, "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"load {i}"}]}).encode(),
                headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                    with lock:
                        finished.append((time.monotonic(), r.headers["X-Request-Id"]))
            except OSError:
                return

    try:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        while len(finished) < 40 or time.monotonic() - finished[0][0] < 1.5:
            time.sleep(0.01)
        [writer] = [c for c in psutil.Process(proc.pid).children() if "anyad.store.writer" in " ".join(c.cmdline())]
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        # The writer commits what it had been handed, and does not outlive the daemon.
        _, alive = psutil.wait_procs([writer], timeout=30)
        assert not alive
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    conn = sqlite3.connect(data / "anyad.db")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r[0] for r in conn.execute("SELECT request_id FROM exchanges")}
    due = {rid for t, rid in finished if t <= killed_at - 0.2}
    assert due and due <= stored
    # Each stored exchange is whole: its conversation and both messages are there.
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2 * len(stored)
    assert conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == len(stored)


def run_cli(tmp_path, *args, input=None):
    env = clean_env(tmp_path)
    env["ANYAD_DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run(anyad_cmd("history", *args), env=env, capture_output=True, text=True, timeout=60,
                          input=input)


def test_history_command(tmp_path):
    p = run_cli(tmp_path, "list")
    assert p.returncode == 1 and "no history yet" in p.stderr
    store = Store(tmp_path / "data" / "anyad.db")
    store.record(exchange("first-chat", "Tell me about otters"))
    store.record(exchange("second-chat", "Tell me about beavers"))
    store.close()

    p = run_cli(tmp_path, "list")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "UPDATED", "MODEL", "MESSAGES", "TITLE"]
    assert lines[1].startswith("second-chat") and lines[2].startswith("first-chat")
    assert "Tell me about otters" in lines[2]
    p = run_cli(tmp_path, "list", "-q", "otters")
    assert [l.split()[0] for l in p.stdout.splitlines()[1:]] == ["first-chat"]

    p = run_cli(tmp_path, "show", "first-chat")
    assert p.returncode == 0 and "[user]\nTell me about otters" in p.stdout and "[assistant]\nhi" in p.stdout
    p = run_cli(tmp_path, "show", "nope")
    assert p.returncode == 1 and "no conversation" in p.stderr and "Traceback" not in p.stderr

    p = run_cli(tmp_path, "export")
    exported = json.loads(p.stdout)
    assert [c["id"] for c in exported] == ["first-chat", "second-chat"]
    assert exported[0]["messages"][0]["content"] == "Tell me about otters"
    p = run_cli(tmp_path, "export", "--format", "jsonl")
    assert [json.loads(l)["id"] for l in p.stdout.splitlines()] == ["first-chat", "second-chat"]

    p = run_cli(tmp_path, "purge")  # not a terminal and no --yes: refuses
    assert p.returncode == 2 and "--yes" in p.stderr
    p = run_cli(tmp_path, "purge", "--yes")
    assert p.returncode == 0 and "deleted 2" in p.stdout
    assert run_cli(tmp_path, "list").stdout.strip() == "no conversations"


async def test_a_data_directory_with_uri_characters_in_its_name(make_client, tiny_model, tmp_path):
    """SQLite reads its read-only connections by URI: "?", "#" and "%" in the path are the
    directory's own characters, not a query, a fragment or an escape."""
    data = tmp_path / "odd?mode=rw#x%41"
    c = await make_client(make_settings(tiny_model, tmp_path).model_copy(update={"data_dir": data}))
    r, _ = await chat(c)
    conv = await conversation(c, r.headers["X-Anyad-Conversation-Id"])
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"]
    assert (data / "anyad.db").exists() and not (tmp_path / "odd").exists()
