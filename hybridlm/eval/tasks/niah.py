"""Needle in a haystack, modelled on RULER's NIAH single-1/2/3 (Hsieh et al., 2024).

    niah-1  a number for a word key in repeated noise sentences        (RULER S-NIAH-1)
    niah-2  a number for a word key in prose distractor text            (RULER S-NIAH-2)
    niah-3  a UUID for a two-word key among many similar key-UUID pairs  (S-NIAH-3, plus distractor needles)

The sequence is ``haystack-with-needle  query  answer`` and is exactly ``length`` tokens long. The
needle sits at the sentence boundary nearest to ``depth`` (a fraction of the haystack; by default
spread evenly over the examples, RULER-style). Options (``niah-2:digits=4,haystack=grammar``):
digits (numbers), haystack (noise | stdlib | grammar), depth (0..1), template (ruler | short),
distractors (niah-3: how many other key-UUID needles).
"""
from __future__ import annotations

import random
from typing import Any

from hybridlm.eval.tasks.base import Example, Task, require
from hybridlm.eval.tasks.text import ADJECTIVES, NOUNS, SOURCES, sentence_stream

TEMPLATES = {
    "ruler": {
        "needle": "One of the special magic {kind}s for {key} is: {value}.",
        "query": " What is the special magic {kind} for {key} mentioned in the provided text?"
                 " The special magic {kind} for {key} mentioned in the provided text is: ",
    },
    "short": {
        "needle": "The magic {kind} for {key} is {value}.",
        "query": " The magic {kind} for {key} is ",
    },
}


class NeedleTask(Task):
    value_kind = "number"
    OPTIONS = {"digits": (int, 7), "haystack": (str, "noise"), "depth": (float, None),
               "template": (str, "ruler"), "distractors": (int, 0)}

    def check_options(self) -> None:
        o = self.opt
        self.check_digits()
        require(o["haystack"] in SOURCES, self.name, f"haystack={o['haystack']!r}; choose one of {', '.join(SOURCES)}")
        require(o["depth"] is None or 0 <= o["depth"] <= 1, self.name, f"depth={o['depth']} must be in [0, 1]")
        require(o["template"] in TEMPLATES, self.name, f"template={o['template']!r}; choose one of {', '.join(TEMPLATES)}")
        require(0 <= o["distractors"] <= 1000, self.name, f"distractors={o['distractors']} must be in [0, 1000]")

    # what differs between the three tasks
    def check_digits(self) -> None:
        require(1 <= self.opt["digits"] <= 12, self.name, f"digits={self.opt['digits']} must be in [1, 12]")

    def key(self, rng: random.Random) -> str:
        return rng.choice(NOUNS)

    def value(self, rng: random.Random) -> str:
        digits = self.opt["digits"]
        return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))

    def chance(self) -> float:
        return 1.0 / (9 * 10 ** (self.opt["digits"] - 1) if self.opt["digits"] > 1 else 10)

    def needle_text(self, key: str, value: str) -> str:
        return " " + TEMPLATES[self.opt["template"]]["needle"].format(kind=self.value_kind, key=key, value=value)

    def example(self, length: int, rng: random.Random, index: int, count: int) -> Example:
        key, value = self.key(rng), self.value(rng)
        needle = self.encode(self.needle_text(key, value))
        query = self.encode(TEMPLATES[self.opt["template"]]["query"].format(kind=self.value_kind, key=key))
        answer = self.encode(value)
        others = self.distractor_needles(rng, key)
        budget = length - len(needle) - len(query) - len(answer) - sum(map(len, others))
        minimum = length - budget + 1
        require(budget >= 1, self.name, f"length {length} is too short: the needle, query and answer alone "
                f"take {length - budget} tokens; ask for at least {minimum}, or shorten them "
                "(options template=short, digits, distractors)")
        haystack, boundaries = self.haystack(rng, budget)
        depth = self.opt["depth"]
        if depth is None:  # spread evenly over the examples, like RULER's depth sweep
            depth = index / (count - 1) if count > 1 else rng.random()
        # Insert the distractors first (at random boundaries), then the needle at its depth.
        pieces: list[tuple[int, list[int]]] = [(rng.choice(boundaries), d) for d in others]
        needle_at = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
        pieces.append((needle_at, needle))
        ids: list[int] = []
        cursor = 0
        needle_start = -1
        for at, piece in sorted(pieces, key=lambda p: (p[0], p[1] is needle)):
            ids += haystack[cursor:at]
            cursor = at
            if piece is needle:
                needle_start = len(ids)
            ids += piece
        ids += haystack[cursor:] + query
        context_len = len(ids)
        ids += answer
        meta: dict[str, Any] = {"key": key, "value": value, "depth": depth, "needle_start": needle_start,
                                "needle_len": len(needle), "context_len": context_len,
                                "needle_depth": needle_at / budget}
        return Example(ids, [(context_len, len(ids))], meta)

    def distractor_needles(self, rng: random.Random, key: str) -> list[list[int]]:
        out = []
        for _ in range(self.opt["distractors"]):
            other = self.key(rng)
            while other == key:
                other = self.key(rng)
            out.append(self.encode(self.needle_text(other, self.value(rng))))
        return out

    def haystack(self, rng: random.Random, budget: int) -> tuple[list[int], list[int]]:
        """Exactly ``budget`` tokens of whole sentences (the last one cut), and the sentence starts."""
        ids: list[int] = []
        boundaries = [0]
        for sentence in sentence_stream(self.opt["haystack"], rng):
            ids += self.encode(" " + sentence)
            if len(ids) >= budget:
                break
            boundaries.append(len(ids))
        return ids[:budget], boundaries + [budget]  # the end too: depth 1 sits right before the query


class NIAH1(NeedleTask):
    name = "niah-1"


class NIAH2(NeedleTask):
    name = "niah-2"
    OPTIONS = {**NeedleTask.OPTIONS, "haystack": (str, "stdlib")}


class NIAH3(NeedleTask):
    name = "niah-3"
    value_kind = "uuid"
    OPTIONS = {**NeedleTask.OPTIONS, "haystack": (str, "stdlib"), "distractors": (int, 4),
               "digits": (int, 32)}

    def check_digits(self) -> None:
        require(self.opt["digits"] in (8, 12, 16, 20, 24, 28, 32), self.name,
                f"digits={self.opt['digits']} (hex digits of the UUID) must be a multiple of 4 from 8 to 32")

    def key(self, rng: random.Random) -> str:
        # Many keys share a word with another ("amber falcon", "amber river"): similar keys.
        return f"{rng.choice(ADJECTIVES[:8])} {rng.choice(NOUNS[:12])}"

    def value(self, rng: random.Random) -> str:
        hexes = f"{rng.getrandbits(4 * self.opt['digits']):0{self.opt['digits']}x}"
        groups = [8, 4, 4, 4, 12]
        out, i = [], 0
        for g in groups:
            if i >= len(hexes):
                break
            out.append(hexes[i:i + g])
            i += g
        return "-".join(out)

    def chance(self) -> float:
        return 16.0 ** -self.opt["digits"]
