"""Perplexity by position on any text file: does the loss keep falling past the training length?

``ppl:file=PATH`` cuts the file's tokens into consecutive windows of exactly ``length`` tokens
(one window per example, in file order, wrapping around for more examples than windows) and scores
every next-token prediction. The harness reports perplexity overall and per position bucket
(``buckets`` log2-spaced edges: [0, 64), [64, 128), ..., up to the length).
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from hybridlm.eval.tasks.base import Example, Task, TaskError, require

FIRST_BUCKET = 64


@lru_cache(maxsize=4)
def _file_tokens(path: str, mtime: float, encode) -> tuple[int, ...]:
    return tuple(encode(_read_text(Path(path))))


def _read_text(path: Path) -> str:
    """The file as UTF-8 text, or a TaskError saying what is wrong with it."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TaskError(f"task ppl: file={str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TaskError(f"task ppl: file={str(path)!r} is not UTF-8 text (byte {err.start} is "
                        f"{raw[err.start:err.start + 1]!r}); give a UTF-8 text file") from None


def _file_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a text file to score, checked without reading it whole."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder; name a text file in it"
    if not path.is_file():  # /dev/zero, a pipe, a socket: reading would never end or block
        return "is not a regular file (a device, pipe or socket); name a text file"
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    if path.stat().st_size == 0:
        return "is empty; it needs text to score"
    return None


def position_buckets(length: int, first: int = FIRST_BUCKET) -> list[tuple[int, int]]:
    """[0, first), [first, 2·first), [2·first, 4·first), ... clipped to ``length`` (positions of targets)."""
    edges = [0]
    edge = first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


class Perplexity(Task):
    name = "ppl"
    metric = "perplexity"
    OPTIONS = {"file": (str, None)}

    def check_options(self) -> None:
        path = self.opt["file"]
        require(path is not None, self.name, "needs a text file: --task ppl:file=PATH")
        problem = _file_problem(Path(path))
        require(problem is None, self.name, f"file={path!r} {problem}")

    def tokens(self) -> tuple[int, ...]:
        path = Path(self.opt["file"])
        return _file_tokens(str(path.resolve()), path.stat().st_mtime, self.tokenizer.encode)

    def chance(self) -> float:
        return 1.0 / self.tokenizer.vocab_size

    def example(self, length: int, rng: random.Random, index: int, count: int) -> Example:
        tokens = self.tokens()
        windows = len(tokens) // length
        require(length >= 2, self.name, f"length {length} must be at least 2")
        require(windows >= 1, self.name, f"{self.opt['file']} has {len(tokens)} tokens, fewer than length {length}")
        start = (index % windows) * length
        return Example(list(tokens[start:start + length]), [(1, length)], {"window": index % windows})
