"""Secret references → values, at the moment of use; never logged, never returned.

``env:VAR`` reads the environment, ``keyring:NAME`` the OS keyring (service
``anyad``), ``cred:NAME`` a systemd credential in ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import os
from pathlib import Path

from anyad.errors import ConfigError

KEYRING_SERVICE = "anyad"


def resolve(ref: str) -> str:
    scheme, _, name = ref.partition(":")
    if scheme == "env":
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"secret {ref}: environment variable {name} is not set")
        return value
    if scheme == "cred":
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ConfigError(f"secret {ref}: $CREDENTIALS_DIRECTORY is not set (is anyad running under systemd "
                              "with LoadCredential=?)")
        try:
            return (Path(base) / name).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"secret {ref}: cannot read credential {name}: {exc.strerror}") from None
    if scheme == "keyring":
        try:
            import keyring
            from keyring.errors import KeyringError
        except ImportError:
            raise ConfigError(f"secret {ref}: the keyring package is not installed") from None
        try:
            value = keyring.get_password(KEYRING_SERVICE, name)
        except KeyringError as exc:
            raise ConfigError(f"secret {ref}: no usable keyring backend ({type(exc).__name__}); install "
                              "keyrings.alt for a file backend or run a Secret Service") from None
        if value is None:
            raise ConfigError(f"secret {ref}: no such secret in the keyring (set it with: anyad secrets set {name})")
        return value
    raise ConfigError(f"secret reference {ref!r}: expected env:, keyring: or cred:")
