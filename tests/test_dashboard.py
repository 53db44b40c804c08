"""The dashboard at GET /, in a real headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil

import pytest

from anyad.config import parse_settings
from conftest import MODEL_ID

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
# As on this machine's closed network: no background traffic, no first-run, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


@pytest.fixture
async def browser():
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        await b.close()


async def test_the_dashboard_shows_the_model_and_chats(make_client, tiny_model, tmp_path, browser, monkeypatch):
    monkeypatch.delenv("DASH_UNSET_KEY", raising=False)
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model), "preload": True}},
        # A provider whose key is missing: never asked, but shown as misconfigured, with why.
        "providers": {"nokey": {"base_url": "http://127.0.0.1:9/v1", "api_key": "env:DASH_UNSET_KEY"}}}))
    base = str(c.make_url("/"))
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    await page.goto(base)
    # The model table shows the tiny model, loaded (it preloads), with its placement.
    row = page.locator(f'#models tr[data-model="{MODEL_ID}"]')
    await row.wait_for(timeout=20000)
    # (Locators, not wait_for_function: the page's content-security policy forbids eval.)
    await row.locator("td:nth-child(2)", has_text=re.compile("^loaded$")).wait_for(timeout=20000)
    assert "cpu" in (await row.locator("td").nth(2).text_content()).lower()
    assert "RAM" in await page.locator("#devices").text_content()
    assert (await page.locator("#health").text_content()) == "ok"
    problem = page.locator('#breakers [data-provider="nokey"]')
    await problem.wait_for(timeout=20000)
    assert (await problem.text_content()) == \
        "nokey: misconfigured: secret env:DASH_UNSET_KEY: environment variable DASH_UNSET_KEY is not set"
    # A chat typed into the page streams a reply, as long as the max-tokens box allows…
    await page.locator(f'#model-picker option[value="{MODEL_ID}"]').wait_for(state="attached")
    await page.select_option("#model-picker", MODEL_ID)
    assert await page.input_value("#max-tokens") == "256"
    await page.fill("#max-tokens", "6")
    await page.fill("#prompt", "hello from the browser")
    await page.click("#send")
    await page.wait_for_selector("#reply[data-done=true]", timeout=60000)
    reply = await page.locator("#reply").text_content()
    meta = await page.locator("#reply-meta").text_content()
    assert reply and f"done · {MODEL_ID} · 6 tokens" in meta
    # …that then appears in the history list, and the search finds it.
    item = page.locator("#conversations li", has_text="hello from the browser")
    await item.wait_for(timeout=20000)
    await page.fill("#search", "browser")
    await page.locator("#conversations li[data-id]", has_text="hello from the browser").wait_for(timeout=20000)
    assert await page.locator("#conversations li[data-id]").count() == 1
    await page.fill("#search", "nothing-like-this")
    await page.locator("#conversations li", has_text="nothing matches").wait_for(timeout=5000)
    shot = tmp_path / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10000
    assert not problems, problems


async def test_the_dashboard_asks_for_the_key_when_one_is_needed(make_client, tiny_model, tmp_path, browser,
                                                                monkeypatch):
    monkeypatch.setenv("DASH_KEY", "dash-key-81")
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"), "server": {"api_keys": ["env:DASH_KEY"]},
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    page = await browser.new_page()
    await page.goto(str(c.make_url("/")))  # the page itself needs no key
    await page.locator("#key-box").wait_for(state="visible", timeout=10000)
    assert (await page.locator("#health").text_content()) == "API key needed"
    await page.fill("#api-key", "dash-key-81")
    await page.dispatch_event("#api-key", "change")
    await page.locator(f'#models tr[data-model="{MODEL_ID}"]').wait_for(timeout=10000)
    assert (await page.locator("#health").text_content()) == "ok"
    # The data behind it still needs the key.
    assert (await c.get("/api/status")).status == 401 and (await c.get("/")).status == 200


async def test_the_dashboard_shows_each_pools_replicas(make_client, tmp_path, browser, start_replicas):
    reps = await start_replicas(2)
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"),
        "pools": {"fleet": {"model": "m", "replicas": [{"base_url": u, "name": f"r{i}"} for i, (_, u) in enumerate(reps)],
                            "health_interval_s": 3600}}}))
    reps[1][0].healthy = False
    await c.daemon.pools["fleet"].check()
    for _ in range(3):
        r = await c.post("/v1/chat/completions", json={"model": "fleet", "max_tokens": 4,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert r.status == 200
    page = await browser.new_page()
    await page.goto(str(c.make_url("/")))
    up, down = page.locator('#pools tr[data-replica="fleet@r0"]'), page.locator('#pools tr[data-replica="fleet@r1"]')
    await down.wait_for(timeout=20000)
    assert [await up.locator("td").nth(i).text_content() for i in (1, 3, 4)] == ["up", "3", "100 %"]
    assert (await down.locator("td").nth(1).text_content()) == "down: /health answered 503"


async def test_the_chat_goes_on_over_turns_and_a_reply_can_be_stopped(make_client, tiny_model, tmp_path, browser,
                                                                      start_fake):
    """Two turns continue one conversation (its id comes back with the first reply and goes
    with the second, which carries the whole transcript and the system prompt); a reply
    that does not come can be stopped, and the box is usable again."""
    slow, url = await start_fake("hang")
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {"slow": {"base_url": url, "models": ["x"], "max_retries": 0}}}))
    page = await browser.new_page(viewport={"width": 360, "height": 800})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    await page.goto(str(c.make_url("/")))
    await page.locator(f'#model-picker option[value="{MODEL_ID}"]').wait_for(state="attached")
    await page.select_option("#model-picker", MODEL_ID)
    await page.fill("#max-tokens", "4")
    await page.fill("#temperature", "0")
    await page.fill("#system", "You are terse.")
    for question in ("first question", "second question"):
        await page.fill("#prompt", question)
        await page.click("#send")
        await page.wait_for_selector("#reply[data-done=true]", timeout=60000)
    assert "first question" in await page.locator("#transcript").text_content()
    assert "first token" in await page.locator("#reply-meta").text_content()
    await asyncio.to_thread(c.daemon.store.flush)  # the history is written off the reply's path
    page_ = (await (await c.get("/api/conversations")).json())["data"]
    assert len(page_) == 1 and page_[0]["exchanges"] == 2  # one conversation, continued
    conv = await (await c.get(f"/api/conversations/{page_[0]['id']}")).json()
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert conv["messages"][3]["content"] == "second question"
    # A reply that hangs: Stop ends it, and the box is usable again.
    await page.select_option("#model-picker", "slow/x")
    await page.fill("#prompt", "never answered")
    await page.click("#send")
    await page.locator("#stop:not([disabled])").wait_for()
    await page.click("#stop")
    await page.wait_for_selector("#reply[data-done=stopped]", timeout=20000)
    assert (await page.locator("#reply-meta").text_content()).startswith("stopped")
    assert await page.locator("#send").is_enabled() and not await page.locator("#stop").is_enabled()
    await page.screenshot(path=str(tmp_path / "chat-360.png"), full_page=True)
    # From the history, later: the conversation opens with its turns and goes on.
    await asyncio.to_thread(c.daemon.store.flush)
    cid = page_[0]["id"]
    before = (await (await c.get(f"/api/conversations/{cid}")).json())["exchanges"]
    await page.reload()
    await page.locator(f'#model-picker option[value="{MODEL_ID}"]').wait_for(state="attached")
    await page.locator(f'#conversations li[data-id="{cid}"] button.open').click()
    await page.locator("#transcript .turn.user", has_text="second question").wait_for(timeout=20000)
    assert await page.input_value("#system") == "You are terse."
    await page.select_option("#model-picker", MODEL_ID)
    await page.fill("#max-tokens", "3")
    await page.fill("#prompt", "third question")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#reply[data-done=true]", timeout=60000)
    await asyncio.to_thread(c.daemon.store.flush)
    after = await (await c.get(f"/api/conversations/{cid}")).json()
    assert len(after["exchanges"]) == len(before) + 1 and after["messages"][-2]["content"] == "third question"
    # ...and can be deleted from the list.
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.locator(f'#conversations li[data-id="{cid}"] button.delete').click()
    await page.locator(f'#conversations li[data-id="{cid}"]').wait_for(state="detached", timeout=20000)
    assert (await c.get(f"/api/conversations/{cid}")).status == 404
    assert not problems, problems


async def test_models_load_and_unload_from_the_page(make_client, tiny_model, tmp_path, browser):
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    page = await browser.new_page()
    await page.goto(str(c.make_url("/")))
    row = page.locator(f'#models tr[data-model="{MODEL_ID}"]')
    await row.locator('button[data-action="load"]').click()
    await row.locator('button[data-action="unload"]').wait_for(timeout=60000)
    assert (await row.locator("td").nth(1).text_content()) == "loaded"
    assert (await (await c.get("/api/status")).json())["models"][MODEL_ID]["state"] == "loaded"
    await row.locator('button[data-action="unload"]').click()
    await row.locator('button[data-action="load"]').wait_for(timeout=60000)
    assert (await row.locator("td").nth(1).text_content()) == "unloaded"


async def test_the_charts_draw_from_real_traffic(make_client, tiny_model, tmp_path, browser):
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    for i in range(3):
        r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 4, "stream": i == 2,
                                                       "messages": [{"role": "user", "content": f"chart {i}"}]})
        await r.read()
        assert r.status == 200
    timeline = await (await c.get("/api/timeline")).json()
    step = timeline["step_s"]
    assert sum(p["requests"] for p in timeline["points"]) == 3
    assert timeline["points"][-1]["ram_total_bytes"] > 0
    page = await browser.new_page()
    await page.goto(str(c.make_url("/")))
    chart = page.locator("#chart-requests")
    await chart.wait_for(timeout=20000)
    ok_rates, error_rates = json.loads(await chart.get_attribute("data-points"))
    assert round(sum(v for v in ok_rates if v) * step) == 3 and not any(error_rates)
    tokens = json.loads(await page.locator("#chart-tokens").get_attribute("data-points"))[0]
    assert round(sum(v for v in tokens if v) * step) == 12  # 4 tokens each
    assert await page.locator("#chart-tokens svg path.line").count() == 1
    ttft = json.loads(await page.locator("#chart-ttft").get_attribute("data-points"))[0]
    assert any(v is not None and v > 0 for v in ttft)
    await page.screenshot(path=str(tmp_path / "dashboard-1280.png"), full_page=True)


async def test_the_page_allows_nothing_from_elsewhere_and_its_assets_are_cached_for_good(make_client, tmp_path):
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data")}))
    r = await c.get("/")
    html = await r.text()
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert r.headers["Cache-Control"] == "no-cache"
    urls = re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)
    assert len(urls) == 2 and all("?v=" in u for u in urls)
    total = 0
    for u in urls:
        a = await c.get(u)
        assert a.status == 200 and a.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        total += len(await a.read())
    assert total + len(html) < 150_000  # the page and its assets
