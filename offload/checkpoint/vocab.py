"""A checkpoint's tokenizer: tokenizer.json beside the weights, else the one a GGUF file embeds (gguf_vocab.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from offload.checkpoint.gguf_vocab import gguf_tokenizer
from offload.errors import CheckpointError


def load_tokenizer(path: Path, metadata: Mapping[str, Any]) -> Tokenizer | None:
    """The tokenizer of the checkpoint at ``path`` (a folder, or a .gguf file with its ``metadata``); None when it
    has none (generate() then takes token ids)."""
    file = path / "tokenizer.json"
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
            raise CheckpointError(f"{file} cannot be read ({e})", "re-download it") from None
    return gguf_tokenizer(metadata)
