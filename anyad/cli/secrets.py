"""``anyad secrets set NAME | list | delete NAME``: provider keys in the OS keyring."""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
from typing import Any

from anyad.cli.common import USAGE, add_config, error, fail
from anyad.errors import ConfigError
from anyad.secrets import KEYRING_SERVICE, delete_secret, list_secrets, set_secret


def _audit(config: str | None, action: str, name: str) -> None:
    """The change goes into the audit log (never the value); a config or database that
    cannot be used only costs the record, with a word on stderr."""
    from anyad.audit import cli_actor, record_offline
    from anyad.config import load_settings

    try:
        settings = load_settings(config)
        if settings.audit.enabled:
            record_offline(settings.resolved_data_dir, cli_actor(), action, name)
    except (ConfigError, OSError, sqlite3.Error) as exc:
        error(f"the change is made but not in the audit log: {exc}")


def cmd_secrets(args: argparse.Namespace) -> int:
    try:
        if args.action == "set":
            if sys.stdin.isatty():
                value = getpass.getpass(f"Value for {args.name} (not shown): ")
            else:
                value = sys.stdin.read().rstrip("\r\n")
            set_secret(args.name, value)
            print(f"stored {args.name} in the keyring (service {KEYRING_SERVICE!r}); "
                  f'refer to it as api_key = "keyring:{args.name}"')
            _audit(args.config, "secret.set", args.name)
        elif args.action == "list":
            names = list_secrets()
            print("\n".join(names) if names else "no secrets stored")
        elif not delete_secret(args.name):
            return fail(f"no secret {args.name!r} in the keyring")
        else:
            print(f"deleted {args.name}")
            _audit(args.config, "secret.delete", args.name)
    except ConfigError as exc:
        return fail(str(exc), USAGE)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("secrets", help="store, list or delete provider keys in the OS keyring")
    add_config(p, help="config file, to find the database for the audit log")
    ps = p.add_subparsers(dest="action", required=True)
    st = ps.add_parser("set", help="store a secret, read from a hidden prompt or from standard input")
    st.add_argument("name")
    ps.add_parser("list", help="the names of the stored secrets (never their values)")
    dl = ps.add_parser("delete", help="remove a secret")
    dl.add_argument("name")
    p.set_defaults(func=cmd_secrets)
