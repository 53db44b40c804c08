"""``anyad models list`` (configured and discovered GGUF files) and ``anyad models verify``
(every configured model file against its ``sha256``)."""

from __future__ import annotations

import argparse
from typing import Any

from anyad.cli import settings_or_report
from anyad.integrity import file_sha256
from anyad.tables import size
from anyad.tables import table as text_table


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


def cmd_list(args: argparse.Namespace) -> int:
    """Configured models, then what discovery finds (whether or not ``models.discover`` serves them)."""
    import json
    import logging

    from anyad.discovery import Found, discover
    from anyad.errors import ConfigError
    from anyad.gguf_meta import read_gguf_info

    settings = settings_or_report(args.config)
    if settings is None:
        return 2
    if args.verbose:
        logging.basicConfig(level="INFO", format="%(message)s")
    rows: list[Found] = []
    for model_id, m in settings.models.items():
        try:
            rows.append(Found(model_id, m.path, "config", read_gguf_info(m.path)))
        except ConfigError as exc:
            print(f"anyad: {model_id}: {exc}")
    rows += discover(settings.discovery, taken=set(settings.models))
    if args.json:
        print(json.dumps([{"id": f.id, "size_bytes": f.info.size_bytes, "quantization": f.info.quantization,
                           "context_length": f.info.context_length, "architecture": f.info.architecture,
                           "source": f.source, "path": str(f.path)} for f in rows], indent=2))
        return 0
    if not rows:
        print("no models configured or found (sources: " + ", ".join(settings.discovery.sources) + ")")
        return 0
    table = [["ID", "SIZE", "QUANT", "CONTEXT", "ARCH", "SOURCE", "PATH"]]
    table += [[f.id, size(f.info.size_bytes), f.info.quantization or "?", str(f.info.context_length or "?"),
               f.info.architecture, f.source, str(f.path)] for f in rows]
    print("\n".join(text_table(table)))
    if not settings.discovery.discover and any(f.source != "config" for f in rows):
        print("\nfound models are listed here only; [models] discover = true serves them too")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list the configured and discovered models, check model files")
    ps = p.add_subparsers(dest="action", required=True)
    ls = ps.add_parser("list", help="configured models and GGUF files found in known places")
    ls.add_argument("--config", help="config file")
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    ls.add_argument("-v", "--verbose", action="store_true", help="say which files were skipped and why")
    ls.set_defaults(func=cmd_list)
    v = ps.add_parser("verify", help="check every model that has a sha256 against its file")
    v.add_argument("--config", help="config file")
    v.set_defaults(func=cmd_verify)
