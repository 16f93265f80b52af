"""A small text corpus made of the running Python's standard library: its sources and docstrings.

    python -m hybridlm.studies.corpus --out runs/corpus/python-stdlib

Study 3 (discretization) trains on it: text that ships with every Python, so it needs no download
and is the same wherever the same Python version runs. The folder holds

    train.jsonl     one {"text", "source"} record per document (hybridlm train reads JSON lines)
    valid.txt       held-out documents as plain text (the eval harness's ``ppl:file=`` task)
    manifest.json   Python version, counts, byte sizes and the sha256 of both files

Documents are the ``.py`` files of the standard library (tests, ``site-packages`` and bundled
wheels left out) and, for modules written in C, their docstrings and those of their public
members. Files are cut at line boundaries into documents of at most ``DOC_BYTES``, so no single
file dominates and the packer never holds a huge document. Which document goes where is decided
by a hash of its name: the order is a deterministic shuffle, the held-out set a fixed 1 in
``VALID_EVERY`` files (all pieces of a file on one side), and the byte budgets keep whole
documents in shuffled order until they are full.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import platform
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

from hybridlm.errors import HybridLMError

CORPUS_VERSION = 1
MAX_BYTES = 9_500_000  # both files together: under the 10 MiB the GPU box is sent
VALID_BYTES = 500_000  # held-out text, part of MAX_BYTES
VALID_EVERY = 20  # one document in 20 is held out (until VALID_BYTES is reached)
DOC_BYTES = 64 * 1024
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "ensurepip"})
# C modules that are imported for their docstrings, except those whose import does something.
SKIP_MODULES = frozenset({"readline", "antigravity", "this", "xxlimited", "xxlimited_35", "xxsubtype"})
TRAIN_FILE, VALID_FILE, MANIFEST_FILE = "train.jsonl", "valid.txt", "manifest.json"


@dataclass(frozen=True)
class Document:
    source: str  # "Lib/json/decoder.py#0" or "C:math"
    text: str

    @property
    def rank(self) -> bytes:
        """Position in the deterministic shuffle."""
        return hashlib.sha256(self.source.encode()).digest()

    @property
    def held_out(self) -> bool:
        """Decided per file (the name before '#'), so no file is split between train and valid."""
        digest = hashlib.sha256(self.source.split("#")[0].encode()).digest()
        return int.from_bytes(digest[:4], "big") % VALID_EVERY == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_documents(root: Path) -> list[Document]:
    """The standard library's ``.py`` files, cut into documents of at most DOC_BYTES."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test fixtures in other encodings; not worth guessing
            continue
        for i, piece in enumerate(split_at_lines(text, DOC_BYTES)):
            docs.append(Document(f"Lib/{rel.as_posix()}#{i}", piece))
    return docs


def split_at_lines(text: str, limit: int) -> list[str]:
    """Consecutive pieces of at most ``limit`` UTF-8 bytes, cut after a newline (a longer line alone
    is one piece)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if current and size + n > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def c_module_names(root: Path) -> list[str]:
    """Public modules written in C: built into the interpreter or in lib-dynload."""
    names = set(sys.builtin_module_names)
    dynload = root / "lib-dynload"
    if dynload.is_dir():
        names |= {p.name.split(".")[0] for p in dynload.iterdir() if p.suffix in (".so", ".pyd")}
    return sorted(n for n in names if not n.startswith("_") and n not in SKIP_MODULES)


def docstring_documents(root: Path) -> list[Document]:
    """One document per C module: its docstring, then each public member's, in name order."""
    docs = []
    for name in c_module_names(root):
        try:
            with warnings.catch_warnings():  # deprecated modules (audioop, nis, ...) warn on import
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # missing on this build, or refuses to import here: skip, it is recorded
            continue
        parts = [f"Help on module {name}:\n\n{inspect.getdoc(module) or ''}\n"]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            # Functions and classes only: a constant's "docstring" is its type's (int's, str's), repeated.
            doc = inspect.getdoc(obj) if not attr.startswith("_") and callable(obj) else None
            if doc:
                parts.append(f"\n{name}.{attr}\n    " + doc.replace("\n", "\n    ") + "\n")
        text = "".join(parts)
        docs += [Document(f"C:{name}#{i}", piece) for i, piece in enumerate(split_at_lines(text, DOC_BYTES))]
    return docs


def json_line(doc: Document) -> str:
    return json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False) + "\n"


def split_corpus(docs: list[Document], max_bytes: int, valid_bytes: int) -> tuple[list[Document], list[Document]]:
    """(train, valid) in shuffled order, whole documents only, within the byte budgets."""
    train, valid = [], []
    used_train = used_valid = 0
    for doc in sorted(docs, key=lambda d: d.rank):
        if doc.held_out:  # over the held-out budget or not, never trained on
            size = len(doc.text.encode("utf-8")) + 2
            if used_valid + size <= valid_bytes:
                valid.append(doc)
                used_valid += size
            continue
        size = len(json_line(doc).encode("utf-8"))
        if used_train + size <= max_bytes - valid_bytes:  # the held-out budget is reserved up front
            train.append(doc)
            used_train += size
    return train, valid


def build_corpus(out: str | Path, *, max_bytes: int = MAX_BYTES, valid_bytes: int | None = None) -> dict:
    """Write train.jsonl, valid.txt and manifest.json to ``out``; returns the manifest. The held-out
    part defaults to VALID_BYTES, or a tenth of ``max_bytes`` when that is less."""
    if valid_bytes is None:
        valid_bytes = min(VALID_BYTES, max_bytes // 10)
    if max_bytes <= valid_bytes or valid_bytes <= 0:
        raise HybridLMError(f"corpus budget: max_bytes ({max_bytes}) must exceed valid_bytes ({valid_bytes}) > 0")
    root = stdlib_root()
    if not root.is_dir():
        raise HybridLMError(f"the standard library folder {root} does not exist: cannot build the corpus")
    docs = source_documents(root) + docstring_documents(root)
    train, valid = split_corpus(docs, max_bytes, valid_bytes)
    if not train or not valid:
        raise HybridLMError(f"the standard library at {root} gave too little text for a corpus")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_bytes = "".join(json_line(d) for d in train).encode("utf-8")
    valid_text = "\n\n".join(d.text.strip("\n") for d in valid) + "\n"
    valid_bytes_out = valid_text.encode("utf-8")
    (out / TRAIN_FILE).write_bytes(train_bytes)
    (out / VALID_FILE).write_bytes(valid_bytes_out)
    manifest = {
        "corpus": "python-stdlib", "version": CORPUS_VERSION,
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "stdlib": str(root),
        "train": {"file": TRAIN_FILE, "documents": len(train), "bytes": len(train_bytes),
                  "sha256": hashlib.sha256(train_bytes).hexdigest()},
        "valid": {"file": VALID_FILE, "documents": len(valid), "bytes": len(valid_bytes_out),
                  "sha256": hashlib.sha256(valid_bytes_out).hexdigest()},
        "documents_available": len(docs), "max_bytes": max_bytes, "valid_bytes": valid_bytes,
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a built corpus; one clear error when the folder is not one."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file() or not (folder / TRAIN_FILE).is_file() or not (folder / VALID_FILE).is_file():
        raise HybridLMError(f"{folder} is not a built corpus (needs {TRAIN_FILE}, {VALID_FILE}, {MANIFEST_FILE}); "
                            "build it with: python -m hybridlm.studies.corpus --out " + str(folder))
    return json.loads(path.read_text())


def verify_corpus(folder: str | Path) -> dict:
    """The manifest, after checking both files still have the recorded sha256."""
    manifest = read_manifest(folder)
    for part in ("train", "valid"):
        data = (Path(folder) / manifest[part]["file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest[part]["sha256"]:
            raise HybridLMError(f"{folder}/{manifest[part]['file']} does not match its manifest's sha256: rebuild it")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridlm.studies.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/corpus/python-stdlib", help="folder to write (default %(default)s)")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="both files together (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out, max_bytes=args.max_bytes)
    except HybridLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: Python {manifest['python']}, {manifest['train']['documents']} training documents "
          f"({manifest['train']['bytes']:,} bytes, sha256 {manifest['train']['sha256'][:12]}), "
          f"{manifest['valid']['documents']} held out ({manifest['valid']['bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
