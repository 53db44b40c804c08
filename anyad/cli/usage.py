"""``anyad usage``: requests, tokens, errors, cache hits and cost, by day, model or key."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from anyad.cli.common import USAGE, add_config, database, fail, load
from anyad.tables import table as text_table


def cmd_usage(args: argparse.Namespace) -> int:
    from anyad.store.usage import parse_time, report

    settings = load(args.config)
    try:
        start = parse_time(args.since) if args.since else None
        end = parse_time(args.until) if args.until else None
    except ValueError as exc:
        return fail(str(exc), USAGE)
    rows = report(database(settings), key=args.key, model=args.model, start=start, end=end,
                  group_by=args.group_by)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    columns = [args.group_by, "requests", "prompt_tokens", "completion_tokens", "errors", "cache_hits", "cost"]
    if args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in columns])
        return 0
    if not rows:
        print("no usage recorded" + (" for that selection" if args.key or args.model or start or end else ""))
        return 0
    table = [[c.upper().replace("_", " ") for c in columns]]
    table += [[str(r[args.group_by]), str(r["requests"]), str(r["prompt_tokens"]), str(r["completion_tokens"]),
               str(r["errors"]), str(r["cache_hits"]), "-" if r["cost"] is None else f"{r['cost']:.4f}"]
              for r in rows]
    print("\n".join(text_table(table, right=range(1, len(columns)))))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("usage", help="requests, tokens, errors, cache hits and cost by day, model or key")
    add_config(p)
    p.add_argument("--key", help="only this key (its name)")
    p.add_argument("--model", help="only this model (as asked for)")
    p.add_argument("--since", help="from this date or time (ISO, UTC unless it says)")
    p.add_argument("--until", help="up to this date or time (not included)")
    p.add_argument("--group-by", choices=["day", "model", "key"], default="day")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_usage)
