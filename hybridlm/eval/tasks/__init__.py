"""Seeded task generators: retrieval (NIAH, MQAR), state tracking, perplexity by position.

    from hybridlm.eval.tasks import make_task
    task = make_task("niah-2:digits=4", tokenizer)      # or make_task("mqar", tok, pairs=8)
    examples = task.examples(length=512, n=100, seed=0)

A task argument is ``name[:option=value[:option=value...]]``; several are joined with commas.
"""
from __future__ import annotations

from typing import Any

from hybridlm.eval.tasks.base import Example, Task, TaskError, example_rng
from hybridlm.eval.tasks.batching import collate
from hybridlm.eval.tasks.mqar import MQAR
from hybridlm.eval.tasks.niah import NIAH1, NIAH2, NIAH3
from hybridlm.eval.tasks.perplexity import Perplexity, position_buckets
from hybridlm.eval.tasks.state_tracking import (LengthCurriculum, ModularArithmetic, ModularArithmeticBrackets,
                                                ModularSum, ModularSumBrackets, Parity)

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (NIAH1, NIAH2, NIAH3, MQAR, Parity, ModularArithmetic,
                                                          ModularArithmeticBrackets, ModularSum, ModularSumBrackets,
                                                          Perplexity)}


def parse_task(arg: str) -> tuple[str, dict[str, str]]:
    """``"niah-2:digits=4:haystack=grammar"`` -> ``("niah-2", {"digits": "4", "haystack": "grammar"})``."""
    name, *parts = arg.strip().split(":")
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    options = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise TaskError(f"task {name}: option {part!r} must look like key=value (as in {name}:key=value)")
        options[key.strip()] = value.strip()
    return name, options


def parse_tasks(arg: str) -> list[tuple[str, dict[str, str]]]:
    tasks = [parse_task(a) for a in arg.split(",") if a.strip()]
    if not tasks:
        raise TaskError(f"no task given; choose from {', '.join(TASKS)}")
    return tasks


def make_task(arg: str, tokenizer, **options: Any) -> Task:
    name, parsed = parse_task(arg)
    return TASKS[name](tokenizer, **{**parsed, **options})


__all__ = ["Example", "Task", "TaskError", "TASKS", "LengthCurriculum", "collate", "example_rng", "make_task",
           "parse_task", "parse_tasks", "position_buckets"]
