"""Distractor text that needs no download: RULER-style noise, Python's own docstrings, a seeded grammar.

Each source yields an endless stream of sentences (strings); tasks encode each sentence on its own,
so needles always sit at a sentence boundary, whatever the tokenizer.
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from functools import lru_cache
from itertools import cycle, islice
from typing import Iterator

# RULER's "noise" haystack for NIAH single-1.
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# Modules whose docstrings are long, prose-like and present in every CPython build.
DOC_MODULES = ("argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "decimal",
               "difflib", "email.message", "enum", "fractions", "functools", "heapq", "html.parser",
               "http.client", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
               "shutil", "statistics", "string", "subprocess", "tempfile", "textwrap", "threading", "typing",
               "unittest", "urllib.parse", "zipfile")

NOUNS = ("apple", "river", "falcon", "lantern", "harbor", "meadow", "engine", "violin", "glacier", "pepper",
         "compass", "orchid", "canyon", "mirror", "ember", "saddle", "thunder", "marble", "willow", "beacon",
         "puzzle", "quartz", "ribbon", "summit", "tunnel", "velvet", "walnut", "yarrow", "zephyr", "anchor",
         "badger", "candle", "dolphin", "feather", "garnet", "hammock", "island", "jasmine", "kettle", "ladder",
         "magnet", "needle", "oyster", "parrot", "quiver", "rocket", "spider", "tomato", "umbrella", "window")
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
              "keen", "lucky", "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy",
              "upper", "vivid", "warm", "young", "zesty")
VERBS = ("watches", "follows", "carries", "finds", "paints", "builds", "hides", "greets", "measures", "answers",
         "remembers", "crosses", "opens", "guards", "counts")
PREPOSITIONS = ("near", "behind", "above", "under", "beside", "beyond", "inside", "across")

SOURCES = ("noise", "stdlib", "grammar")


def _clean_doc(doc: str) -> list[str]:
    """Prose sentences of a docstring: drop doctest and code-like lines, rejoin wrapped lines."""
    lines = [ln.strip() for ln in doc.splitlines()]
    prose = " ".join(ln for ln in lines if ln and not ln.startswith((">>>", "...", "|", "-", "*", ":"))
                     and not re.search(r"[{}\[\]=]|\(\)|::", ln))
    prose = re.sub(r"\s+", " ", prose)
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose)
    return [s for s in sentences if 20 <= len(s) <= 300 and s[-1] in ".!?" and s.isascii()]


@lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Sentences from the docstrings of :data:`DOC_MODULES` and their public members, in a fixed order."""
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when their docs are read
        warnings.simplefilter("ignore", DeprecationWarning)
        return _collect_sentences()


def _collect_sentences() -> tuple[str, ...]:
    out: list[str] = []
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python; the other modules still give plenty of text
            continue
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            out.extend(_clean_doc(doc))
    return tuple(dict.fromkeys(out))  # drop repeats (inherited docstrings), keep order


def grammar_sentence(rng: random.Random) -> str:
    adj, noun = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    obj_adj, obj = rng.choice(ADJECTIVES), rng.choice(NOUNS)
    sentence = f"The {adj} {noun} {rng.choice(VERBS)} the {obj_adj} {obj}"
    if rng.random() < 0.5:
        sentence += f" {rng.choice(PREPOSITIONS)} the {rng.choice(NOUNS)}"
    return sentence + "."


def sentence_stream(source: str, rng: random.Random) -> Iterator[str]:
    """An endless stream of sentences; stdlib text starts at a seeded offset and wraps around."""
    if source == "noise":
        return cycle(NOISE_SENTENCES)
    if source == "stdlib":
        sentences = stdlib_sentences()
        start = rng.randrange(len(sentences))
        return islice(cycle(sentences), start, None)
    if source == "grammar":
        return (grammar_sentence(rng) for _ in iter(int, 1))
    raise ValueError(f"unknown haystack {source!r}; choose one of {', '.join(SOURCES)}")
