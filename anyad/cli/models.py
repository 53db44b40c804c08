"""``anyad models list`` (what the running daemon serves, else the configured and discovered
GGUF files) and ``anyad models verify`` (every configured model file against its ``sha256``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from anyad.cli.common import (
    FAILED,
    OK,
    DaemonError,
    NoDaemon,
    add_config,
    add_daemon_arguments,
    api_key,
    base_url,
    error,
    fail,
    get_json,
    load,
)
from anyad.integrity import file_sha256
from anyad.tables import size
from anyad.tables import table as text_table

if TYPE_CHECKING:
    from anyad.config import Settings


def cmd_verify(args: argparse.Namespace) -> int:
    settings = load(args.config)
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
    return FAILED if bad else OK


def cmd_list(args: argparse.Namespace) -> int:
    """What a daemon answering at the configured address serves; without one, the configured
    models, then what discovery finds (whether or not ``models.discover`` serves them)."""
    settings = load(args.config, host=args.host, port=args.port)
    if args.local:
        return _list_local(settings, args)
    try:
        served = get_json(settings, "/v1/models", api_key(args))
    except NoDaemon:
        error(f"no daemon answers at {base_url(settings)}; listing the config and the model files found here")
        return _list_local(settings, args)
    except DaemonError as exc:
        return fail(f"{exc} (or --local lists the config and the model files found here)")
    data = served.get("data") if isinstance(served, dict) else None
    if not isinstance(data, list):
        return fail(f"{base_url(settings)}/v1/models is not a list of models; is it an anyad daemon?")
    return _list_served(data, base_url(settings), args)


def _list_served(data: list[dict[str, Any]], url: str, args: argparse.Namespace) -> int:
    import json

    rows = [{"id": m.get("id"), "owned_by": m.get("owned_by"), "context_length": m.get("context_length"),
             "architecture": m.get("architecture"), "source": "daemon", "url": url}
            for m in data if isinstance(m, dict)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"the daemon at {url} serves no models")
        return 0
    table = [["ID", "OWNED BY", "CONTEXT", "ARCH", "SOURCE"]]
    table += [[str(r["id"]), str(r["owned_by"] or "-"), str(r["context_length"] or "-"), str(r["architecture"] or "-"),
               "daemon"] for r in rows]
    print("\n".join(text_table(table)))
    print(f"\nserved by the daemon at {url}")
    return 0


def _list_local(settings: "Settings", args: argparse.Namespace) -> int:
    import json
    import logging

    from anyad.discovery import Found, discover
    from anyad.errors import ConfigError
    from anyad.gguf_meta import read_gguf_info

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
    ls = ps.add_parser("list", help="what the running daemon serves, else the configured models and GGUF files "
                                    "found in known places")
    add_config(ls, help="config file")
    add_daemon_arguments(ls)
    ls.add_argument("--local", action="store_true",
                    help="do not ask a running daemon: the config and the GGUF files found here")
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    ls.add_argument("-v", "--verbose", action="store_true", help="say which files were skipped and why (with --local "
                                                                 "or without a daemon)")
    ls.set_defaults(func=cmd_list)
    v = ps.add_parser("verify", help="check every model that has a sha256 against its file")
    add_config(v, help="config file")
    v.set_defaults(func=cmd_verify)
