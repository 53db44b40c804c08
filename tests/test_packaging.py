"""What a user installs: import names under anyad., backends found through entry points."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_llama_cpp_backend_is_registered_as_an_entry_point():
    from anyad.backend import backend_class
    from anyad.backends.llama_cpp.backend import LlamaCppBackend

    names = {ep.name: ep.value for ep in entry_points(group="anyad.backends")}
    assert names.get("llama_cpp") == "anyad.backends.llama_cpp.backend:LlamaCppBackend"
    assert backend_class("llama_cpp") is LlamaCppBackend


def test_unknown_backend_is_a_clear_config_error():
    from anyad.backend import backend_class
    from anyad.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backend 'vllm'.*llama_cpp"):
        backend_class("vllm")


def test_wheel_installs_everything_under_anyad(tmp_path):
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("anyad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"anyad", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for module in ("anyad/backends/llama_cpp/backend.py", "anyad/backends/llama_cpp/worker.py",
                   "anyad/plugins/__init__.py", "anyad/api/chat.py"):
        assert module in names
    ep = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[anyad.backends]" in ep and "anyad = anyad.cli:main" in ep
