"""Multi-query associative recall (MQAR, Arora et al. 2023 "Zoology").

    k1 v1 k2 v2 ... kn vn  . 7 3 k5 v5 9 . k2 v2 ...  (to exactly ``length`` tokens)

``pairs`` key-value pairs open the sequence; ``queries`` of the keys come back later at random
positions among noise tokens, each followed by its value, which is the scored item. Keys, values
and noise are disjoint single-token symbols (lowercase letters, uppercase letters, digits), so
the task works with any tokenizer that has them as single tokens. Options: pairs (default 16),
queries (default: pairs; more than pairs asks keys again), gap (min noise tokens between the pairs
and the first query, default 0).
"""
from __future__ import annotations

import random
import string

from hybridlm.eval.tasks.base import Example, Task, require

KEY_SYMBOLS = string.ascii_lowercase
VALUE_SYMBOLS = string.ascii_uppercase
NOISE_SYMBOLS = string.digits


class MQAR(Task):
    name = "mqar"
    OPTIONS = {"pairs": (int, 16), "queries": (int, None), "gap": (int, 0)}

    def check_options(self) -> None:
        self.keys = self.single_tokens(KEY_SYMBOLS, "key")
        self.values = self.single_tokens(VALUE_SYMBOLS, "value")
        self.noise = self.single_tokens(NOISE_SYMBOLS, "noise")
        pairs = self.opt["pairs"]
        require(1 <= pairs <= len(self.keys), self.name,
                f"pairs={pairs} must be in [1, {len(self.keys)}] (distinct single-token keys of this tokenizer)")
        if self.opt["queries"] is None:
            self.opt["queries"] = pairs
        require(self.opt["queries"] >= 1, self.name, f"queries={self.opt['queries']} must be at least 1")
        require(self.opt["gap"] >= 0, self.name, f"gap={self.opt['gap']} must be >= 0")
        require(len(self.values) >= 2 and self.noise, self.name,
                f"tokenizer {self.tokenizer.name!r} lacks single-token value or noise symbols")

    def chance(self) -> float:
        return 1.0 / len(self.values)

    def min_length(self) -> int:
        return 2 * self.opt["pairs"] + self.opt["gap"] + 2 * self.opt["queries"]

    def example(self, length: int, rng: random.Random, index: int, count: int) -> Example:
        n, q = self.opt["pairs"], self.opt["queries"]
        require(length >= self.min_length(), self.name,
                f"length {length} is too short for {n} pairs and {q} queries; ask for at least {self.min_length()}")
        keys = rng.sample(self.keys, n)
        values = [rng.choice(self.values) for _ in range(n)]
        ids = [tok for kv in zip(keys, values) for tok in kv]
        ids += [rng.choice(self.noise) for _ in range(self.opt["gap"])]
        region = length - len(ids)
        # q non-overlapping 2-token slots among `region` positions: sorted distinct offsets, spread.
        starts = [v + i for i, v in enumerate(sorted(rng.sample(range(region - q), q)))]
        # Each key once while there are keys left, then again (dense supervision for training).
        asked = rng.sample(range(n), q) if q <= n else [rng.randrange(n) for _ in range(q)]
        tail = [rng.choice(self.noise) for _ in range(region)]
        answers = []
        for start, pair in zip(starts, asked):
            tail[start], tail[start + 1] = keys[pair], values[pair]
            answers.append((len(ids) + start + 1, len(ids) + start + 2))
        return Example(ids + tail, answers, {"pairs": n, "queries": q,
                                              "distances": [s - 2 * p for (s, _), p in zip(answers, asked)]})
