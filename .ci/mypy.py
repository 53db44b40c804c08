"""mypy on the package as it is installed: `.venv/bin/python .ci/mypy.py [mypy options] [paths]`.

pyproject.toml's [tool.setuptools.package-dir] installs backends/ as anyad.backends,
plugins/ as anyad.plugins and systemd/ as anyad.systemd, and the code imports them by
those names. The editable install finds them with an import hook, which mypy does not
run (it reads files, it executes nothing), so `mypy anyad backends plugins` would see
three unrelated top-level packages. This builds the installed layout as a tree of
symlinks (.mypy_cache/layout/anyad/: every entry of anyad/, plus backends, plugins and
systemd under their installed names), runs mypy on it with pyproject.toml's [tool.mypy],
and writes mypy's report with the paths of the files in this checkout (backends/x.py,
not .mypy_cache/layout/anyad/backends/x.py). The tree sits at a fixed place so that
mypy's cache stays valid from one run to the next; it is rebuilt on every run.

Paths given (files or folders of anyad/, backends/, plugins/) are checked in place of
the whole package; other arguments go to mypy as they are. The exit status is mypy's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_cache" / "layout"
PACKAGE = TREE / "anyad"
# The installed name, under anyad/, of each folder outside it (pyproject.toml's package-dir).
with open(ROOT / "pyproject.toml", "rb") as f:
    MAPPED = {folder: name.removeprefix("anyad.")
              for name, folder in tomllib.load(f)["tool"]["setuptools"]["package-dir"].items()}
SKIP = {"__pycache__"}
# A mypy message starts with a path (then :line, :line:col or `: error`).
LOCATION = re.compile(r"^(?P<path>[^\s:][^:]*\.pyi?)(?P<rest>:.*)$")


def build_tree() -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    PACKAGE.mkdir(parents=True)
    for entry in sorted((ROOT / "anyad").iterdir()):
        if entry.name not in SKIP:
            (PACKAGE / entry.name).symlink_to(entry)
    for folder, name in MAPPED.items():
        (PACKAGE / name).symlink_to(ROOT / folder, target_is_directory=True)


def to_tree(arg: str) -> str:
    """A path of this checkout as the tree has it (anything else unchanged)."""
    path = Path(arg).resolve()
    if not path.exists():
        return arg
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return arg
    parts = rel.parts
    if parts and parts[0] == "anyad":
        return str(TREE.joinpath(*parts))
    if parts and parts[0] in MAPPED:
        return str(PACKAGE.joinpath(MAPPED[parts[0]], *parts[1:]))
    return arg


def to_checkout(line: str) -> str:
    """A line of mypy's report with the tree's path replaced by the checkout's."""
    match = LOCATION.match(line.rstrip("\n"))
    if not match:
        return line
    path = Path(match["path"])
    real = Path(os.path.realpath(path if path.is_absolute() else ROOT / path))
    try:
        shown = real.relative_to(ROOT)
    except ValueError:
        return line
    return f"{shown}{match['rest']}\n"


def main(argv: list[str]) -> int:
    build_tree()
    args = [to_tree(a) for a in argv]
    if not any(a != o for a, o in zip(args, argv)):
        args.append(str(PACKAGE.relative_to(ROOT)))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(to_checkout(line))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
