"""``anyad pull URL | hf:ORG/REPO/FILE.gguf``: download a model file, resumable and verified."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

from anyad.cli.common import INTERRUPTED, add_config, fail, load


def cmd_pull(args: argparse.Namespace) -> int:
    from anyad.download import DownloadError, progress_bar, pull

    settings = load(args.config)
    dest = Path(args.dir).expanduser() if args.dir else settings.resolved_data_dir / "models"
    try:
        path = asyncio.run(pull(args.source, dest, sha256=args.sha256, revision=args.revision,
                                progress=None if args.quiet else progress_bar()))
    except DownloadError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)  # off the progress bar's line
        return fail("stopped; run the same command again to resume", INTERRUPTED)
    except OSError as exc:  # the directory: not writable, not a directory, …
        return fail(f"cannot save into {dest}: {exc.strerror or exc}")
    print(f"saved {path}")
    key = path.stem if re.fullmatch(r"[A-Za-z0-9_-]+", path.stem) else json.dumps(path.stem)
    print(f"serve it: anyad serve --model {path}   (or a [models.{key}] table with path = {json.dumps(str(path))})")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a GGUF file (resumable, verified) by URL or hf:ORG/REPO/FILE.gguf")
    p.add_argument("source", help="an http(s) URL, or hf:ORG/REPO/FILE.gguf for a file on the Hugging Face hub")
    p.add_argument("--sha256", help="the file's expected SHA-256 (else the hub's published one, when it has one)")
    p.add_argument("--dir", help="where to save it (default: the data directory's models/)")
    p.add_argument("--revision", default="main", help="for hf: sources, the branch, tag or commit (default main)")
    add_config(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pull)
