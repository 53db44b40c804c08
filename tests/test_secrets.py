"""``anyad secrets`` against a real keyring backend (the file backend of keyrings.alt),
and a clear message where there is no backend at all."""

from __future__ import annotations

import subprocess
import sys

from conftest import anyad_cmd, clean_env

SECRET = "sk-test-Zq8vXw3Lm9Pa7Rt2"
FILE_BACKEND = "keyrings.alt.file.PlaintextKeyring"


def run(tmp_path, *args, input=None, backend=FILE_BACKEND):
    env = clean_env(tmp_path)  # XDG_DATA_HOME in tmp_path: the backend's file lives there
    env["PYTHON_KEYRING_BACKEND"] = backend
    return subprocess.run(anyad_cmd("secrets", *args), env=env, capture_output=True, text=True, input=input,
                          timeout=60)


def test_set_list_resolve_delete(tmp_path):
    p = run(tmp_path, "set", "openai", input=SECRET + "\n")
    assert p.returncode == 0, p.stderr
    assert 'api_key = "keyring:openai"' in p.stdout
    run(tmp_path, "set", "anthropic", input="another-value")
    p = run(tmp_path, "list")
    assert p.stdout.split() == ["anthropic", "openai"]
    # The daemon's resolver reads it back from the same keyring.
    env = clean_env(tmp_path)
    env["PYTHON_KEYRING_BACKEND"] = FILE_BACKEND
    got = subprocess.run([sys.executable, "-c", "from anyad.secrets import resolve; "
                          "print(resolve('keyring:openai') == " + repr(SECRET) + ")"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert got.stdout.strip() == "True", got.stderr
    assert run(tmp_path, "delete", "openai").returncode == 0
    assert run(tmp_path, "list").stdout.split() == ["anthropic"]
    p = run(tmp_path, "delete", "openai")
    assert p.returncode == 1 and "no secret 'openai'" in p.stderr
    p = run(tmp_path, "set", "bad name!", input="x")
    assert p.returncode == 2 and "secret name" in p.stderr
    p = run(tmp_path, "set", "empty", input="\n")
    assert p.returncode == 2 and "empty" in p.stderr


def test_no_secret_value_is_ever_printed(tmp_path):
    outputs = [run(tmp_path, "set", "openai", input=SECRET), run(tmp_path, "list"),
               run(tmp_path, "delete", "openai"), run(tmp_path, "delete", "openai")]
    for p in outputs:
        assert SECRET not in p.stdout and SECRET not in p.stderr


def test_without_a_keyring_backend_the_error_says_what_to_do(tmp_path):
    p = run(tmp_path, "set", "openai", input=SECRET, backend="keyring.backends.fail.Keyring")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "keyrings.alt" in p.stderr and "Secret Service" in p.stderr and "cred:" in p.stderr
    assert SECRET not in p.stderr
    p = run(tmp_path, "list", backend="keyring.backends.fail.Keyring")
    assert p.returncode == 2 and "no usable keyring backend" in p.stderr
