"""``anyad plugins``: what is installed (entry points ``anyad.plugins``) and what is enabled."""

from __future__ import annotations

import argparse
import json
from typing import Any

from anyad.cli.common import FAILED, OK, add_config, error, load
from anyad.tables import table as text_table


def cmd_plugins(args: argparse.Namespace) -> int:
    from anyad.plugin_manager import describe, installed

    settings = load(args.config)
    enabled = set(settings.plugins.enabled)
    rows: list[dict[str, Any]] = []
    for ep in installed():
        dist = ep.dist
        rows.append({"name": ep.name, "enabled": ep.name in enabled, "object": ep.value,
                     "package": f"{dist.name} {dist.version}" if dist is not None else "",
                     "description": describe(ep)})
    missing = sorted(enabled - {r["name"] for r in rows})
    if args.json:
        print(json.dumps({"plugins": rows, "enabled_but_not_installed": missing}, indent=2))
        return FAILED if missing else OK
    if not rows:
        print("no plugins installed")
    else:
        table = [["NAME", "ENABLED", "PACKAGE", "DESCRIPTION"]]
        table += [[r["name"], "yes" if r["enabled"] else "no", r["package"], r["description"]] for r in rows]
        print("\n".join(text_table(table)))
        print('\nenable one with [plugins] enabled = ["NAME", ...] in the config')
    for name in missing:
        error(f"plugins.enabled names {name!r}, which is not installed")
    return FAILED if missing else OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plugins", help="list the installed plugins and which are enabled")
    add_config(p, help="config file, for [plugins] enabled")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_plugins)
