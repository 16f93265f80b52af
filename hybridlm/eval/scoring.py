"""Score examples with a model: greedy exact match per answer item, and the NLL of every answer token.

One teacher-forced forward pass per batch; the LM head runs only at the positions that predict
answer tokens, so long contexts with large vocabularies stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from hybridlm.eval.tasks.base import Example

HEAD_ROWS = 8192  # LM-head rows at a time: bounds the (rows, vocab) logits tensor


@dataclass
class ItemScore:
    correct: bool
    nll: float  # summed over the item's tokens (nats)
    tokens: int


@dataclass
class ExampleScore:
    items: list[ItemScore]
    token_nll: Tensor  # (answer tokens,) per-token NLL in order of the spans, on the CPU


@torch.no_grad()
def score_batch(model, examples: Sequence[Example], pad_id: int = 0) -> list[ExampleScore]:
    device = next(model.parameters()).device
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    rows, cols = [], []
    for b, ex in enumerate(examples):
        ids[b, :len(ex)] = torch.tensor(ex.ids)
        for start, end in ex.answers:
            if not 1 <= start < end <= len(ex):
                raise ValueError(f"answer span {(start, end)} lies outside a {len(ex)}-token example")
            rows += [b] * (end - start)
            cols += range(start - 1, end - 1)  # logits at t predict token t+1
    ids = ids.to(device)
    hidden = model.features(ids)
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    targets = ids[rows_t, cols_t + 1]
    nll_parts, hit_parts = [], []
    for lo in range(0, len(rows), HEAD_ROWS):
        sel = slice(lo, lo + HEAD_ROWS)
        logits = model.output(hidden[rows_t[sel], cols_t[sel]]).float()
        nll_parts.append(torch.nn.functional.cross_entropy(logits, targets[sel], reduction="none"))
        hit_parts.append(logits.argmax(-1) == targets[sel])
    nll = torch.cat(nll_parts).cpu()
    hit = torch.cat(hit_parts).cpu()

    out, cursor = [], 0
    for ex in examples:
        items = []
        first = cursor
        for start, end in ex.answers:
            n = end - start
            items.append(ItemScore(bool(hit[cursor:cursor + n].all()), float(nll[cursor:cursor + n].sum()), n))
            cursor += n
        out.append(ExampleScore(items, nll[first:cursor]))
    return out
