"""``anyad audit``: the newest rows of the audit log, read from anyad.db."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from typing import Any

from anyad.cli.common import add_config, database, fail, load
from anyad.tables import table as text_table


def cmd_audit(args: argparse.Namespace) -> int:
    from anyad.audit import read

    path = database(load(args.config))
    if not path.exists():
        print("no audit log yet" if not args.json else "[]")
        return 0
    try:
        rows = list(read(path, limit=args.limit, action=args.action))
    except sqlite3.Error as exc:
        return fail(f"cannot read {path}: {exc}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no audit rows" + (f" for {args.action}" if args.action else ""))
        return 0
    table = [["WHEN", "ACTOR", "ACTION", "TARGET", "STATUS"]]
    table += [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"])), r["actor"] or "-", r["action"],
               r["target"] or "-", "" if r["status"] is None else str(r["status"])] for r in rows]
    print("\n".join(text_table(table)))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("audit", help="show the audit log: admin actions and requests, newest first")
    add_config(p)
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    p.add_argument("--action", help="only this action, e.g. request, secret.set, model.load, config.reload")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_audit)
