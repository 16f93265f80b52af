"""Tokenizers: the built-in byte tokenizer and any `tokenizers` file (``tokenizer.json``).

Both expose ``name``, ``vocab_size``, ``encode(text) -> list[int]`` (no special tokens added),
``decode(ids) -> str``, ``eos_id`` (or None) and ``config()``, the JSON-able record that
:func:`load_tokenizer` reads back (model folders store it).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from hybridlm.errors import BackendUnavailable, HybridLMError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def config(self) -> dict: ...


class ByteTokenizer:
    """Token id = byte value of the UTF-8 text (vocabulary 256, no special tokens)."""

    name = "byte"
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def config(self) -> dict:
        return {"kind": "byte"}

    def save(self, folder: str | Path) -> dict:
        return self.config()


class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a ``tokenizer.json`` file."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:
            raise BackendUnavailable("tokenizer files need the `tokenizers` package: pip install tokenizers") from e
        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception on a malformed file
            raise HybridLMError(f"cannot read tokenizer file {self.path}: {e}") from None
        self.name = self.path.name
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((self._tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
                            if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def config(self) -> dict:
        return {"kind": "tokenizers", "file": TOKENIZER_FILE}

    def save(self, folder: str | Path) -> dict:
        """Copy the tokenizer file into ``folder``; returns the record for :func:`load_tokenizer`."""
        target = Path(folder) / TOKENIZER_FILE
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        return self.config()


def load_tokenizer(ref: "str | Path | dict | Tokenizer | None" = None, folder: str | Path | None = None):
    """``None``/"byte" -> ByteTokenizer; a path to ``tokenizer.json`` (or a folder holding one) ->
    FileTokenizer; a record from ``config()`` is resolved relative to ``folder``."""
    if ref is None or ref == "byte":
        return ByteTokenizer()
    if hasattr(ref, "encode") and hasattr(ref, "vocab_size"):
        return ref
    if isinstance(ref, dict):
        kind = ref.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "tokenizers":
            name = ref.get("file", TOKENIZER_FILE)
            if not isinstance(name, str) or not name:
                raise HybridLMError(f"tokenizer record {ref}: \"file\" must be a file name like {TOKENIZER_FILE!r}, "
                                    f"not {name!r}")
            path = Path(folder or ".") / name
            if not path.is_file():
                raise HybridLMError(f"tokenizer file {path} is missing (the tokenizer record {ref} names it)")
            return FileTokenizer(path)
        raise HybridLMError(f"unknown tokenizer kind {kind!r} in tokenizer record {ref}; expected 'byte' or 'tokenizers'")
    if not isinstance(ref, (str, Path)):
        raise HybridLMError(f"tokenizer {ref!r} is not 'byte', a tokenizer.json path, a tokenizer record "
                            "({'kind': ...}) or a tokenizer object")
    path = Path(ref)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.exists():
        raise HybridLMError(f"tokenizer {str(ref)!r} is neither 'byte' nor an existing tokenizer.json file or folder")
    return FileTokenizer(path)


def check_vocab(tokenizer, vocab_size: int) -> None:
    """A tokenizer must fit the model's embedding table."""
    if tokenizer.vocab_size > vocab_size:
        raise HybridLMError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {vocab_size}; set vocab_size >= {tokenizer.vocab_size} in the spec")
