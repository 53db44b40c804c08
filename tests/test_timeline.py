"""The dashboard's last hour (anyad/timeline.py), on an injected clock: steps roll over,
rates and percentiles are per step, the hour is bounded, events are marks."""

from __future__ import annotations

from anyad.timeline import Timeline


def test_steps_rates_percentiles_and_bounds():
    now = [1000.0]
    tl = Timeline(step_s=5.0, keep=3, clock=lambda: now[0])
    for status in (200, 200, 200, 404, 500):
        tl.request(status)
    for ms in range(1, 101):
        tl.first_token(ms / 1000)
    tl.tokens("m", 40)
    tl.cache_result("hit")
    tl.cache_result("miss")
    tl.mark("fallback", "up/x: timeout")
    tl.gauges(queue=2, ram_used=3 << 30, ram_total=8 << 30, gpus=[])
    [p] = tl.json()["points"]
    assert p["t"] == 1000.0 and p["requests"] == 5
    assert p["requests_per_s"] == {"2xx": 0.6, "4xx": 0.2, "5xx": 0.2}
    assert p["tokens_per_s"] == 8.0 and p["tokens_per_s_by_model"] == {"m": 8.0}
    assert (p["ttft_p50_ms"], p["ttft_p95_ms"]) == (50.0, 95.0)
    assert p["cache_hit_rate"] == 0.5 and p["fallbacks"] == 1 and p["queue"] == 2
    assert tl.json()["marks"] == [{"t": 1000.0, "kind": "fallback", "text": "up/x: timeout"}]
    now[0] += 5  # the next step: nothing yet, and the gauges not sampled in it
    p2 = tl.json()["points"][-1]
    assert p2["t"] == 1005.0 and p2["requests"] == 0 and p2["ttft_p50_ms"] is None and p2["queue"] is None
    now[0] += 60  # steps with nothing in them are not made up; only the newest `keep` stay
    tl.request(200)
    now[0] += 5
    tl.request(200)
    assert [p["t"] for p in tl.json()["points"]] == [1005.0, 1065.0, 1070.0]
