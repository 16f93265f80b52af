"""Run tasks at several lengths over several models: the rows behind the table, JSON and plot.

A model is a spec (YAML or preset; random weights, for smoke runs) or a model folder (it records
the training length, so ``2x`` means twice that, and its tokenizer). Every model sees the same
examples: they depend only on the seed, the task and its options, and the absolute length.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hybridlm.errors import HybridLMError
from hybridlm.eval.scoring import score_batch
from hybridlm.eval.tasks import TASKS, parse_tasks, position_buckets

_LENGTH = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)x|(\d+))\s*$")


@dataclass
class EvalModel:
    name: str
    model: torch.nn.Module
    tokenizer: Any
    train_seq_len: int | None
    source: str
    params: int = 0


@dataclass
class LengthArg:
    label: str
    factor: float | None = None
    tokens: int | None = None

    def resolve(self, train_seq_len: int | None, model_name: str) -> int:
        if self.tokens is not None:
            return self.tokens
        if train_seq_len is None:
            raise HybridLMError(f"length {self.label!r} is relative to the training length, which {model_name} does "
                                "not record (a spec has none): pass --train-len N or absolute lengths like 512")
        return max(1, round(self.factor * train_seq_len))


def parse_lengths(arg: str) -> list[LengthArg]:
    """``"1x,2x,4096"`` -> relative and absolute lengths."""
    out = []
    for part in (p for p in arg.split(",") if p.strip()):
        m = _LENGTH.match(part)
        if not m or (m.group(2) and int(m.group(2)) < 1) or (m.group(1) and float(m.group(1)) <= 0):
            raise HybridLMError(f"length {part!r} must be a positive token count (512) or a multiple of the "
                                "training length (2x, 0.5x)")
        out.append(LengthArg(part.strip(), factor=float(m.group(1))) if m.group(1)
                   else LengthArg(part.strip(), tokens=int(m.group(2))))
    if not out:
        raise HybridLMError("no length given: use e.g. --lengths 1x,2x,4x,8x or --lengths 256,512")
    return out


def load_eval_model(arg: str, *, device: str | torch.device = "cpu", dtype: "torch.dtype | str | None" = None,
                    seed: int = 0, train_seq_len: int | None = None, tokenizer: str | None = None) -> EvalModel:
    """A model folder, or a spec file / preset built with random weights (seeded)."""
    from hybridlm.builder import build_model
    from hybridlm.builder.io.pretrained import (META_FILE, OWN_FILES, SPEC_FILE, is_model_folder, load_pretrained,
                                             resolve_device, resolve_dtype)
    from hybridlm.tokenizer import check_vocab, load_tokenizer

    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    path = Path(arg)
    if path.is_dir():
        if not is_model_folder(path):
            raise HybridLMError(f"{arg} is a folder but not a hybridlm model folder (no {META_FILE})")
        loaded = load_pretrained(path, device=device, dtype=dtype)  # checks every file of the folder
        tok = load_tokenizer(tokenizer) if tokenizer else loaded.tokenizer
        check_vocab(tok, loaded.spec.vocab_size)
        return EvalModel(path.name or path.resolve().name, loaded.model, tok, train_seq_len or loaded.train_seq_len,
                         str(path), _count(loaded.model))
    if path.is_file() and path.name in OWN_FILES and path.name != SPEC_FILE and is_model_folder(path.parent):
        raise HybridLMError(f"{arg} is a file of the model folder {path.parent}: pass the folder itself")
    from hybridlm.layouts.presets import spec_or_preset

    spec = spec_or_preset(arg)
    model = build_model(spec, device=device, dtype=dtype, seed=seed).eval()
    tok = load_tokenizer(tokenizer)
    check_vocab(tok, spec.vocab_size)
    name = path.stem if path.suffix in (".yaml", ".yml") else arg
    return EvalModel(name, model, tok, train_seq_len, arg, _count(model))


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class Cell:
    """One model x task x length result."""

    model: str
    task: str
    length_label: str
    length: int
    examples: int
    items: int
    accuracy: float
    chance: float
    nll_per_token: float
    perplexity: float | None = None
    buckets: list[dict] = field(default_factory=list)

    @property
    def scaled_accuracy(self) -> float:
        return (self.accuracy - self.chance) / (1 - self.chance) if self.chance < 1 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "scaled_accuracy": self.scaled_accuracy}


def evaluate(models: list[EvalModel], task_arg: str, lengths: list[LengthArg], *, samples: int = 100,
             batch_size: int = 8, seed: int = 0, progress: Callable | None = None,
             on_cell: Callable[[Cell, int, int], None] | None = None) -> list[Cell]:
    """Score every model on every task at every length. ``progress``: a tqdm-like bar factory
    (updated per batch); ``on_cell(cell, done, total)`` is called as each cell finishes."""
    parsed = parse_tasks(task_arg)
    cells = []
    plan = []
    for m in models:
        for name, options in parsed:
            task = TASKS[name](m.tokenizer, **options)
            for length in lengths:
                plan.append((m, task, length, length.resolve(m.train_seq_len, m.name)))
    total = len(plan) * math.ceil(samples / batch_size)
    bar = progress(total=total, desc="eval", unit="batch") if progress else None
    for m, task, length, n_tokens in plan:
        examples = task.examples(n_tokens, samples, seed=seed)
        scores = []
        for lo in range(0, len(examples), batch_size):
            scores += score_batch(m.model, examples[lo:lo + batch_size])
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{m.name} {task.describe()}@{length.label}")
        cells.append(_cell(m, task, length, n_tokens, examples, scores))
        if on_cell:
            on_cell(cells[-1], len(cells), len(plan))
    if bar:
        bar.close()
    return cells


def _cell(m: EvalModel, task, length: LengthArg, n_tokens: int, examples, scores) -> Cell:
    items = [it for s in scores for it in s.items]
    tokens = sum(it.tokens for it in items)
    nll = sum(it.nll for it in items) / max(tokens, 1)
    cell = Cell(m.name, task.describe(), length.label, n_tokens, len(examples), len(items),
                sum(it.correct for it in items) / max(len(items), 1), task.chance(), nll)
    if getattr(task, "metric", "accuracy") == "perplexity":
        token_nll = torch.stack([s.token_nll for s in scores])  # (examples, length-1): position t+1 targets
        cell.perplexity = math.exp(nll)
        for lo, hi in position_buckets(n_tokens - 1):
            cell.buckets.append({"start": lo + 1, "end": hi + 1,
                                 "perplexity": math.exp(float(token_nll[:, lo:hi].mean()))})
    return cell
