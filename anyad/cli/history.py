"""``anyad history list | show ID | export | purge``: the chat history, read from anyad.db.

It reads the database file directly (the daemon need not run; when it does, WAL lets
both work at once), from the data directory the config names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from anyad.cli.common import FAILED, USAGE, add_config, database, fail, load
from anyad.store import CONVERSATION_ID, MAX_QUERY_CHARS, HistoryReader, Store
from anyad.tables import table, when


def _one_line(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _list(reader: HistoryReader, args: argparse.Namespace, out: TextIO) -> int:
    if args.q and len(args.q) > MAX_QUERY_CHARS:
        return fail(f"the search is longer than {MAX_QUERY_CHARS} characters", USAGE)
    page = reader.conversations(limit=args.limit, offset=0, q=args.q)
    if not page["data"]:
        out.write("no conversations" + (" match" if args.q else "") + "\n")
        return 0
    rows = [["ID", "UPDATED", "MODEL", "MESSAGES", "TITLE"]]
    rows += [[c["id"], when(c["updated"]), c["model"] or "-", str(c["messages"]), _one_line(c["title"], 60)]
             for c in page["data"]]
    out.writelines(line + "\n" for line in table(rows))
    if page["total"] > len(page["data"]):
        out.write(f"({len(page['data'])} of {page['total']}; --limit shows more)\n")
    return 0


def _show(reader: HistoryReader, args: argparse.Namespace, out: TextIO) -> int:
    conv = reader.conversation(args.id) if CONVERSATION_ID.match(args.id) else None
    if conv is None:
        return fail(f"no conversation {args.id!r}")
    out.write(f"conversation {conv['id']}  (started {when(conv['created'])}, updated {when(conv['updated'])})\n")
    exchanges = {x["id"]: x for x in conv["exchanges"]}
    for m in conv["messages"]:
        out.write(f"\n[{m['role']}]\n{m['content'] or ''}\n")
        x = exchanges.get(m.get("exchange_id"))
        if x is not None:
            out.write(f"  -- {x['backend']} for {x['model']}: {x['finish_reason']}, {x['prompt_tokens']} + "
                      f"{x['completion_tokens']} tokens, {x['latency_ms']:.0f} ms\n")
    return 0


def _export(reader: HistoryReader, args: argparse.Namespace, out: TextIO) -> int:
    dest = open(args.output, "w", encoding="utf-8") if args.output else out
    try:
        if args.format == "jsonl":
            for conv in reader.export():
                dest.write(json.dumps(conv, ensure_ascii=False) + "\n")
        else:
            dest.write("[")
            for i, conv in enumerate(reader.export()):
                dest.write(("," if i else "") + "\n" + json.dumps(conv, ensure_ascii=False))
            dest.write("\n]\n")
    finally:
        if dest is not out:
            dest.close()
    return 0


def _purge(path: Path, args: argparse.Namespace, out: TextIO) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            return fail("purge deletes every conversation; pass --yes to confirm", USAGE)
        if input(f"Delete every conversation in {path}? [y/N] ").strip().lower() not in ("y", "yes"):
            return FAILED
    store = Store(path)
    try:
        n = store.purge().result(30)
    finally:
        store.close()
    out.write(f"deleted {n} conversation(s)\n")
    return 0


def cmd_history(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    path = database(load(args.config))
    if not path.exists():
        if args.action == "purge":
            out.write("deleted 0 conversation(s)\n")
            return 0
        return fail(f"no history yet ({path} does not exist)")
    if args.action == "purge":
        return _purge(path, args, out)
    reader = HistoryReader(path)
    return {"list": _list, "show": _show, "export": _export}[args.action](reader, args, out)


def add_parser(sub: Any) -> None:
    h = sub.add_parser("history", help="list, show, export or purge the chat history")
    add_config(h)
    hs = h.add_subparsers(dest="action", required=True)
    ls = hs.add_parser("list", help="conversations, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("-q", "--query", dest="q", help="only conversations with a message containing all these words")
    show = hs.add_parser("show", help="one conversation, message by message")
    show.add_argument("id")
    ex = hs.add_parser("export", help="every conversation, whole")
    ex.add_argument("--format", choices=["json", "jsonl"], default="json")
    ex.add_argument("--output", "-o", help="write here instead of standard output")
    pg = hs.add_parser("purge", help="delete every conversation")
    pg.add_argument("--yes", action="store_true", help="do not ask")
    h.set_defaults(func=cmd_history)
