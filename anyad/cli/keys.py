"""``anyad keys create NAME | list | revoke NAME | unlock``: API keys kept (as hashes) in anyad.db.

The daemon sees a new or revoked key on its next request, without a restart. So the first
key of all turns keys on for every client at once; that first key must be an admin key
(or ``--yes`` said), else nobody could reach the admin endpoints any more.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from anyad.cli.common import USAGE, add_config, database, fail, load
from anyad.store import connect
from anyad.tables import table as text_table
from anyad.tables import when

if TYPE_CHECKING:
    from anyad.config import Settings


def _expires(text: str) -> float:
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD or an ISO date and time)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def key_state(settings: "Settings", conn: sqlite3.Connection, now: float) -> tuple[bool, bool]:
    """Whether the daemon asks every client for a key, and whether some admin key may answer.

    Any key in the database turns keys on, an expired or revoked one too (as the daemon
    counts them: revoking the last key must not open the daemon to everyone)."""
    db = conn.execute("SELECT count(*), coalesce(sum(revoked IS NULL AND role = 'admin' AND "
                      "(expires IS NULL OR expires > ?)), 0) FROM api_keys", (now,)).fetchone()
    on = bool(settings.server.api_keys or settings.keys or db[0])
    admin = bool(settings.server.api_keys or db[1] or any(
        ks.role == "admin" and (ks.expires is None or ks.expires.timestamp() > now) for ks in settings.keys.values()))
    return on, admin


FIRST_KEY_REFUSED = ("no API key exists yet, so creating {name!r} turns on API keys for every client: each "
                     "one will need a key from then on; and without an admin key nobody can reach /api/status, "
                     "reload or the other admin endpoints. Create an admin key first (anyad keys create NAME "
                     "--role admin) or pass --yes")
KEYS_ON = ("API keys are on now: from now on every client needs a key (Authorization: Bearer KEY; anyad's own "
           "commands take --api-key or $ANYAD_API_KEY)")
NO_ADMIN = ("note: no admin key exists, so nobody can reach /api/status, reload or the other admin endpoints; "
            "create one with: anyad keys create NAME --role admin")


UNLOCK_REFUSED = ("this removes the revoked and expired keys {names}; no other key is left, so the daemon "
                  "will answer every client without a key again (on a loopback address only). Pass --yes to do it")


def _unlock(settings: "Settings", conn: sqlite3.Connection, yes: bool) -> int:
    """Forget revoked and expired keys: with no other key left, the daemon is keyless again.
    This is the one way a daemon that has had keys opens up, so it takes --yes."""
    from anyad.audit import cli_actor, record_offline

    now = time.time()
    gone = [r[0] for r in conn.execute("SELECT name FROM api_keys WHERE revoked IS NOT NULL OR "
                                       "(expires IS NOT NULL AND expires <= ?) ORDER BY name", (now,))]
    left = conn.execute("SELECT count(*) FROM api_keys WHERE revoked IS NULL AND (expires IS NULL OR expires > ?)",
                        (now,)).fetchone()[0]
    opens = not (left or settings.server.api_keys or settings.keys)
    if not gone:
        print("no revoked or expired keys to remove" + ("" if opens else "; other keys are in force"))
        return 0
    if opens and not yes:
        return fail(UNLOCK_REFUSED.format(names=", ".join(gone)), USAGE)
    with conn:
        conn.execute("DELETE FROM api_keys WHERE revoked IS NOT NULL OR (expires IS NOT NULL AND expires <= ?)",
                     (now,))
    record_offline(settings.resolved_data_dir, cli_actor(), "key.unlock", None, {"removed": gone})
    print(f"removed {len(gone)} key(s): {', '.join(gone)}" +
          ("; the daemon needs no key any more" if opens else ""))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from anyad.audit import cli_actor, record_offline
    from anyad.keys import digest, new_key
    from anyad.quotas import day_start, month_start

    settings = load(args.config)
    data_dir = settings.resolved_data_dir
    conn = connect(database(settings))
    try:
        if args.action == "create":
            if args.name in settings.keys:
                return fail(f"{args.name!r} is already a key in the config")
            row = conn.execute("SELECT revoked FROM api_keys WHERE name = ?", (args.name,)).fetchone()
            if row is not None and row[0] is None:
                return fail(f"a key named {args.name!r} exists (revoke it first)")
            if args.expires is not None and args.expires <= time.time():
                return fail("--expires is in the past; the key would never work", USAGE)
            keys_on, admin = key_state(settings, conn, time.time())
            if not keys_on and args.role != "admin" and not args.yes:
                return fail(FIRST_KEY_REFUSED.format(name=args.name), USAGE)
            key = new_key()
            with conn:
                # A revoked key's name may be used again; the new key replaces its row.
                conn.execute("DELETE FROM api_keys WHERE name = ? AND revoked IS NOT NULL", (args.name,))
                conn.execute("INSERT INTO api_keys (name, hash, role, models, tokens_per_day, tokens_per_month, "
                             "requests_per_minute, expires, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (args.name, digest(key), args.role, json.dumps(args.models or []), args.tokens_per_day,
                              args.tokens_per_month, args.requests_per_minute, args.expires, time.time()))
            record_offline(data_dir, cli_actor(), "key.create", args.name, {"role": args.role})
            print(key)
            print(f"the key {args.name!r} ({args.role}) is shown this once; only its hash is kept", file=sys.stderr)
            if not keys_on:
                print(KEYS_ON, file=sys.stderr)
            if not admin and args.role != "admin":
                print(NO_ADMIN, file=sys.stderr)
            return 0
        if args.action == "revoke":
            with conn:
                n = conn.execute("UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                                 (time.time(), args.name)).rowcount
            if not n:
                return fail(f"no active key named {args.name!r}")
            record_offline(data_dir, cli_actor(), "key.revoke", args.name)
            print(f"revoked {args.name}")
            return 0
        if args.action == "unlock":
            return _unlock(settings, conn, args.yes)
        now = time.time()
        rows = []
        for name, role, models, tpd, tpm, rpm, expires, created, revoked in conn.execute(
                "SELECT name, role, models, tokens_per_day, tokens_per_month, requests_per_minute, expires, created, "
                "revoked FROM api_keys ORDER BY name"):
            day, month, total, last = conn.execute(
                "SELECT coalesce(sum(CASE WHEN at >= ? THEN prompt_tokens + completion_tokens END), 0), "
                "coalesce(sum(CASE WHEN at >= ? THEN prompt_tokens + completion_tokens END), 0), count(*), max(at) "
                "FROM usage WHERE key = ?", (day_start(now), month_start(now), name)).fetchone()
            state = "revoked" if revoked else ("expired" if expires and expires <= now else "active")
            rows.append({"name": name, "role": role, "models": json.loads(models or "[]"), "tokens_per_day": tpd,
                         "tokens_per_month": tpm, "requests_per_minute": rpm, "expires": expires, "state": state,
                         "tokens_today": day, "tokens_this_month": month, "requests": total, "last_used": last,
                         "created": created})
        for name, ks in settings.keys.items():
            rows.append({"name": name, "role": ks.role, "models": ks.models, "tokens_per_day": ks.tokens_per_day,
                         "tokens_per_month": ks.tokens_per_month, "requests_per_minute": ks.requests_per_minute,
                         "expires": ks.expires.timestamp() if ks.expires else None, "state": "config"})
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no keys (create one with: anyad keys create NAME)")
            return 0
        table = [["NAME", "ROLE", "STATE", "MODELS", "LIMITS", "TODAY", "REQUESTS", "LAST USED", "EXPIRES"]]
        for r in rows:
            limits = ", ".join(f"{v} {k}" for k, v in (("tok/day", r["tokens_per_day"]), ("tok/month",
                               r["tokens_per_month"]), ("req/min", r["requests_per_minute"])) if v) or "-"
            table.append([r["name"], r["role"], r["state"], ",".join(r["models"]) or "*", limits,
                          str(r.get("tokens_today", "-")), str(r.get("requests", "-")), when(r.get("last_used")),
                          when(r["expires"])])
        print("\n".join(text_table(table)))
        return 0
    finally:
        conn.close()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create, list or revoke API keys (with roles, models and quotas)")
    add_config(p)
    ps = p.add_subparsers(dest="action", required=True)
    c = ps.add_parser("create", help="make a key and print it once")
    c.add_argument("name")
    c.add_argument("--role", choices=["user", "admin"], default="user")
    c.add_argument("--models", nargs="+", metavar="PATTERN", help="glob patterns of the models it may use")
    c.add_argument("--tokens-per-day", type=int)
    c.add_argument("--tokens-per-month", type=int)
    c.add_argument("--requests-per-minute", type=int)
    c.add_argument("--expires", type=_expires, help="a date (YYYY-MM-DD, UTC) or ISO date and time")
    c.add_argument("--yes", action="store_true",
                   help="create it even when it is the first key and not an admin key (every client then needs a "
                        "key, and nobody can reach the admin endpoints)")
    ps.add_parser("list", help="names, roles, limits, usage, last use (never the key)").add_argument(
        "--json", action="store_true")
    r = ps.add_parser("revoke", help="stop a key at once (the daemon stays locked, even after the last one)")
    r.add_argument("name")
    u = ps.add_parser("unlock", help="forget revoked and expired keys; with none left the daemon needs no key")
    u.add_argument("--yes", action="store_true", help="do it even though the daemon then answers without a key")
    p.set_defaults(func=cmd_keys)
