"""What every task produces: token sequences with the spans that are scored.

An :class:`Example` holds the whole sequence (prompt *and* answers, so it is also a training
sequence) and ``answers``: token spans ``[start, end)``, each one scored item. An item is correct
when the model's greedy prediction at positions ``start-1 .. end-2`` reproduces the span — exactly
greedy decoding of the answer, computed in one teacher-forced forward pass.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

from hybridlm.errors import HybridLMError


class TaskError(HybridLMError):
    """A task asked for something it cannot make (a length too short, an unknown option)."""


@dataclass
class Example:
    ids: list[int]
    answers: list[tuple[int, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def answer_ids(self) -> list[list[int]]:
        return [self.ids[s:e] for s, e in self.answers]


def example_rng(seed: int, *parts: Any) -> random.Random:
    """A generator seeded from the seed and a description (task, options, length, index): every
    model and every run sees the same examples, whatever the batch size."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class Task:
    """A seeded generator of scored examples at a requested length.

    ``length`` means total tokens for retrieval tasks and input symbols for state-tracking tasks
    (their ``length_unit``). Subclasses set ``name``, ``OPTIONS`` (option -> (type, default)) and
    implement :meth:`example` and :meth:`chance`; options are read into ``self.opt``.
    """

    name: ClassVar[str]
    length_unit: ClassVar[str] = "tokens"
    OPTIONS: ClassVar[dict[str, tuple[type, Any]]] = {}

    def __init__(self, tokenizer, **options: Any):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            known = ", ".join(self.OPTIONS) or "none"
            raise TaskError(f"task {self.name}: unknown option(s) {', '.join(unknown)} (options: {known})")
        self.tokenizer = tokenizer
        self.options = options
        self.opt = {key: convert_option(self.name, key, options.get(key, default), kind)
                    for key, (kind, default) in self.OPTIONS.items()}
        self.check_options()

    def check_options(self) -> None:
        """Raise :class:`TaskError` for option values out of range."""

    def example(self, length: int, rng: random.Random, index: int, count: int) -> Example:
        raise NotImplementedError

    def chance(self) -> float:
        """Accuracy per item of a model that ignores the context (guesses uniformly among answers)."""
        raise NotImplementedError

    def examples(self, length: int, n: int, seed: int = 0) -> list[Example]:
        return [self.example(length, example_rng(seed, self.name, self.options, length, i), i, n) for i in range(n)]

    def training_example(self, index: int, length: "int | Callable[[int, random.Random], int]",
                         seed: int = 0) -> Example:
        """Training example ``index``: it depends only on (seed, task, options, index), so runs resume
        anywhere. ``length`` is fixed or a function of (index, rng), e.g. a :class:`LengthCurriculum`.
        Needle depths are random here (there is no count to spread them over)."""
        rng = example_rng(seed, self.name, self.options, "train", index)
        n = length(index, rng) if callable(length) else length
        return self.example(n, rng, index, 0)

    def stream(self, length: "int | Callable[[int, random.Random], int]", seed: int = 0,
               start: int = 0) -> Iterator[Example]:
        """Endless training examples from index ``start`` (see :meth:`training_example`)."""
        index = start
        while True:
            yield self.training_example(index, length, seed)
            index += 1

    def describe(self) -> str:
        opts = ":".join(f"{k}={v}" for k, v in sorted(self.options.items()))  # the --task syntax
        return f"{self.name}:{opts}" if opts else self.name

    # -- helpers for subclasses -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def single_tokens(self, symbols: str | tuple[str, ...], what: str) -> list[int]:
        """Token ids of symbols that the tokenizer encodes as exactly one token each."""
        ids = []
        for s in symbols:
            enc = self.encode(s)
            if len(enc) == 1:
                ids.append(enc[0])
        if len(set(ids)) != len(ids):
            raise TaskError(f"{self.name}: two {what} symbols share a token with tokenizer {self.tokenizer.name!r}")
        return ids


def convert_option(task: str, key: str, raw: Any, kind: type) -> Any:
    """Options come from the command line as strings; None means 'the task decides'."""
    if raw is None or isinstance(raw, kind) and not isinstance(raw, bool) or kind is bool and isinstance(raw, bool):
        return raw
    if kind is bool:
        if str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(raw).lower() in ("1", "true", "yes", "on")
    else:
        try:
            return kind(raw)
        except (TypeError, ValueError):
            pass
    raise TaskError(f"task {task}: option {key}={raw!r} is not a valid {kind.__name__}")


def require(condition: bool, task: str, message: str) -> None:
    if not condition:
        raise TaskError(f"task {task}: {message}")
