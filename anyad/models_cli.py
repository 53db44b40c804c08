"""``anyad models verify``: every configured model file against its ``sha256``."""

from __future__ import annotations

import argparse
from typing import Any

from anyad.cli import settings_or_report
from anyad.integrity import file_sha256


def cmd_verify(args: argparse.Namespace) -> int:
    settings = settings_or_report(args.config)
    if settings is None:
        return 2
    bad = 0
    if not settings.models:
        print("no models configured")
    for model_id, m in settings.models.items():
        if not m.sha256:
            print(f"{model_id}: not checked (no sha256 in its config entry)")
            continue
        try:
            actual = file_sha256(m.path)
        except OSError as exc:
            print(f"{model_id}: MISSING {m.path} ({exc.strerror})")
            bad += 1
            continue
        if actual == m.sha256.lower():
            print(f"{model_id}: OK")
        else:
            print(f"{model_id}: MISMATCH {m.path}: expected {m.sha256.lower()}, the file has {actual}")
            bad += 1
    return 1 if bad else 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="check the configured model files")
    ps = p.add_subparsers(dest="action", required=True)
    v = ps.add_parser("verify", help="check every model that has a sha256 against its file")
    v.add_argument("--config", help="config file")
    v.set_defaults(func=cmd_verify)
