"""The ``anyad`` command: one module per subcommand, each with its ``add_parser``; what
they share (settings, data directory, reaching the daemon, errors and exit codes) is
in ``anyad.cli.common``."""

from __future__ import annotations

import argparse

from anyad import __version__
from anyad.cli import (
    audit,
    common,
    history,
    install_service,
    keys,
    models,
    plugins,
    pull,
    secrets,
    serve,
    status,
    usage,
)

# In the order ``anyad --help`` lists them.
COMMANDS = (serve, status, history, secrets, models, audit, install_service, plugins, pull, keys, usage)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyad", description="Local-LLM gateway with an OpenAI-compatible API.")
    p.add_argument("--version", action="version", version=f"anyad {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    return common.run(build_parser().parse_args(argv))
