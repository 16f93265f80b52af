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

from hybridlm.eval.tasks.base import Example, Task, require

FIRST_BUCKET = 64


@lru_cache(maxsize=4)
def _file_tokens(path: str, mtime: float, encode) -> tuple[int, ...]:
    return tuple(encode(Path(path).read_text(encoding="utf-8", errors="replace")))


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
        require(Path(path).is_file(), self.name, f"file={path!r} does not exist")

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
