"""``anyad status``: the running daemon's ``/api/status`` as a table a person can read."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from anyad.cli.common import DaemonError, add_daemon_arguments, api_key, fail, get_json, load
from anyad.tables import size as _size
from anyad.tables import table


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def render(status: dict[str, Any]) -> str:
    out: list[str] = ["DEVICES"]
    dev = status.get("devices") or {}
    if dev:
        out.append(f"  CPU     {dev['cpu_logical']} threads ({dev['cpu_physical']} cores), load {dev['load_1m']:.2f}, "
                   f"RAM {_size(dev['ram_available_bytes'])} of {_size(dev['ram_total_bytes'])} available")
        for g in dev.get("gpus", []):
            util = "" if g.get("utilization_pct") is None else f", {g['utilization_pct']} % busy"
            out.append(f"  GPU {g['index']}   {g['name']}: {_size(g['free_bytes'])} of {_size(g['total_bytes'])} "
                       f"free{util}")
        for note in dev.get("notes", []):
            out.append(f"          ({note})")
    sched = status.get("scheduler") or {}
    limit = sched.get("max_loaded_models")
    out.append("")
    out.append(f"MODELS ({sched.get('loaded', 0)} loaded" + (f", at most {limit})" if limit else ")"))
    rows = [["MODEL", "STATE", "PLACEMENT", "GPU LAYERS", "EST RAM", "EST VRAM", "RSS", "VRAM", "EXPIRES",
             "ACTIVE", "WAITING"]]
    notes: list[str] = []
    for name, m in (status.get("models") or {}).items():
        p = m.get("placement")
        mem = m.get("memory", {})
        q = m.get("queue", {})
        if m.get("state") == "loaded":
            expires = "never" if m.get("keep_alive_s") is None else _duration(m.get("expires_in_s"))
        else:
            expires = "-"
        rows.append([
            name, m.get("state", "?"), p["kind"] if p else "-",
            f"{p['gpu_layers']}/{p['n_layers']}" if p else "-",
            _size(mem.get("estimated_ram_bytes")), _size(mem.get("estimated_vram_bytes")) if p else "-",
            _size(mem.get("rss_bytes")), _size(mem.get("vram_bytes")), expires,
            f"{q.get('active', 0)}/{q.get('parallel', 1)}", f"{q.get('waiting', 0)}/{q.get('max_queue', 0)}",
        ])
        notes += [f"  {name}: {n}" for n in m.get("notes", [])]
        if p:
            notes.append(f"  {name}: {p['reason']}")
    out += table(rows, indent="  ") if len(rows) > 1 else ["  (no local models)"]
    if notes:
        out += ["", "NOTES", *notes]
    breakers = status.get("breakers") or {}
    offline = (status.get("offline") or {}).get("offline")
    # A provider that cannot work as configured (its key cannot be resolved): its whole reason, on its own line.
    broken = {name: p.get("problem") or "?" for name, p in (status.get("providers") or {}).items()
              if p.get("state") == "misconfigured"}
    if breakers or offline or broken:
        out += ["", "REMOTE" + ("  (offline: remote targets are skipped)" if offline else "")]
        rows = [["TARGET", "CIRCUIT", "FAILURES", "LAST ERROR"]]
        for name, b in breakers.items():
            state = "misconfigured" if name.partition("/")[0] in broken else b["state"]
            rows.append([name, state, str(b["consecutive_failures"]),
                         textwrap.shorten(b.get("last_error") or "-", 60, placeholder=" …")])
        if len(rows) > 1:
            out += table(rows, indent="  ")
        out += [f"  {name}: misconfigured: {problem}" for name, problem in broken.items()]
    return "\n".join(out) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    settings = load(args.config, host=args.host, port=args.port)
    try:
        status = get_json(settings, "/api/status", api_key(args))
    except DaemonError as exc:
        return fail(str(exc))
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else render(status))
    return 0


def add_parser(sub: Any) -> None:
    st = sub.add_parser("status", help="show the running daemon's devices, models and queues")
    st.add_argument("--config", help="config file, to find the daemon's address")
    add_daemon_arguments(st)
    st.add_argument("--json", action="store_true", help="print /api/status as JSON")
    st.set_defaults(func=cmd_status)
