"""Facts about a GGUF file read from its header, without loading the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyad.errors import ConfigError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    path: Path
    architecture: str
    name: str | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    chat_template: str | None
    size_bytes: int
    file_type: int | None = None  # llama.cpp's LlamaFileType: the main quantisation
    size_label: str | None = None  # e.g. "0.5B", where the file says

    @property
    def quantization(self) -> str | None:
        """The quantisation's name as llama.cpp and Ollama print it ("Q8_0", "Q4_K_M", "F16")."""
        if self.file_type is None:
            return None
        from gguf import LlamaFileType

        try:
            return LlamaFileType(self.file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return f"type {self.file_type}"


def gguf_scalar(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value of a ``gguf.GGUFReader`` as a Python str/int/float (or ``default``)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read the header; raise ConfigError saying what is wrong with a missing or non-GGUF file."""
    if not path.exists():
        raise ConfigError(f"model file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"model file {path} is not a file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ConfigError(f"model file {path} is not a GGUF file (it does not start with 'GGUF')")

    from gguf import GGUFReader  # imported late: it pulls in numpy

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises many kinds on damaged files
        raise ConfigError(f"model file {path} is a damaged GGUF file: {exc}") from None

    def scalar(key: str):
        return gguf_scalar(reader, key)

    arch = scalar("general.architecture")
    if not arch:
        raise ConfigError(f"model file {path} has no general.architecture: not a model GGUF")
    return GGUFInfo(
        path=path,
        architecture=arch,
        name=scalar("general.name"),
        context_length=scalar(f"{arch}.context_length"),
        block_count=scalar(f"{arch}.block_count"),
        embedding_length=scalar(f"{arch}.embedding_length"),
        chat_template=scalar("tokenizer.chat_template"),
        size_bytes=path.stat().st_size,
        file_type=scalar("general.file_type"),
        size_label=scalar("general.size_label"),
    )
