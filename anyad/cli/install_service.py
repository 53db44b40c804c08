"""``anyad install-service [--user]``: write the systemd unit, pointing at this anyad.

The units live in ``systemd/`` (installed as ``anyad.systemd``); this fills in the
``ExecStart`` of the anyad being run, adjusts the sandbox where that executable would be
hidden from the service, and writes the file where systemd looks (or ``--output``).
``--enable`` then runs ``systemctl daemon-reload`` and ``systemctl enable --now anyad``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from anyad.cli.common import fail

SYSTEM_PATH = Path("/etc/systemd/system/anyad.service")
HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")


def executable() -> str:
    """How the service should start this anyad: the console script beside this Python,
    else the interpreter with ``-m anyad``."""
    script = Path(sys.executable).parent / "anyad"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("anyad")
    return found if found else f"{sys.executable} -m anyad"


def render(user: bool, exe: str | None = None) -> tuple[str, list[str]]:
    """The unit's text and notes for the person installing it."""
    exe = exe or executable()
    name = "anyad-user.service" if user else "anyad.service"
    text = resources.files("anyad.systemd").joinpath(name).read_text()
    notes: list[str] = []
    text, n = re.subn(r"^ExecStart=\S+ serve", lambda m: f"ExecStart={exe} serve", text, flags=re.M)
    if n != 1:
        raise RuntimeError(f"{name} has no ExecStart=… serve line")
    if not user and exe.startswith(HIDDEN_BY_PROTECT_HOME):
        if exe.startswith("/root/"):
            notes.append(f"{exe} is under /root, which the service's own user cannot read: install anyad where "
                         "every user can read it (e.g. python3 -m venv /opt/anyad && /opt/anyad/bin/pip install "
                         "anyad) and run install-service from there")
        text = text.replace("\nProtectHome=yes\n", "\nProtectHome=read-only\n")
        notes.append("anyad is installed under a home directory: the unit uses ProtectHome=read-only instead of "
                     "ProtectHome=yes so that the service can run it")
    return text, notes


def user_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / "anyad.service"


def cmd_install_service(args: argparse.Namespace) -> int:
    text, notes = render(args.user)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output) if args.output else (user_path() if args.user else SYSTEM_PATH)
    if path.exists() and path.read_text() != text and not args.force:
        return fail(f"{path} exists and differs; --force replaces it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except PermissionError:
        return fail(f"cannot write {path}: permission denied (the system service needs root: "
                    f"sudo {executable()} install-service; or install a user service with --user)")
    print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")
    ctl = ["systemctl", "--user"] if args.user else ["systemctl"]
    config = "~/.config/anyad/config.toml" if args.user else "/etc/anyad/config.toml"
    if args.enable:
        for cmd in ([*ctl, "daemon-reload"], [*ctl, "enable", "--now", "anyad"]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                return fail(f"{' '.join(cmd)} failed: {p.stderr.strip() or p.returncode}")
        print(f"started; follow it with: journalctl {'--user ' if args.user else ''}-u anyad -f")
        return 0
    print("next:")
    print(f"  put the config in {config} (see config.example.toml)")
    print(f"  {' '.join(ctl)} daemon-reload && {' '.join(ctl)} enable --now anyad")
    if args.user:
        print("  loginctl enable-linger $USER   # to keep it running while you are logged out")
    print(f"  journalctl {'--user ' if args.user else ''}-u anyad -f   # its log; "
          f"{' '.join(ctl)} reload anyad re-reads the config")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("install-service", help="write the systemd unit (system, or --user) for this anyad")
    p.add_argument("--user", action="store_true", help="a user service (~/.config/systemd/user) instead of a "
                                                       "system one (/etc/systemd/system, needs root)")
    p.add_argument("--output", metavar="PATH", help="write the unit here instead ('-': standard output)")
    p.add_argument("--force", action="store_true", help="replace an existing unit that differs")
    p.add_argument("--enable", action="store_true", help="then run systemctl daemon-reload and enable --now")
    p.set_defaults(func=cmd_install_service)
