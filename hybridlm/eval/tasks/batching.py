"""Examples -> tensors, for training on the tasks and for scoring them."""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from hybridlm.eval.tasks.base import Example

IGNORE_INDEX = -100


def next_token_targets(ex: Example, loss_on: Literal["answers", "all"] = "answers") -> list[int]:
    """``targets[t]`` = the token the logits at ``t`` should predict, or IGNORE_INDEX."""
    if loss_on not in ("answers", "all"):
        raise ValueError(f"loss_on must be 'answers' or 'all', got {loss_on!r}")
    target = [IGNORE_INDEX] * len(ex.ids)
    if loss_on == "all":
        target[:-1] = ex.ids[1:]
    else:
        for start, end in ex.answers:
            target[start - 1:end - 1] = ex.ids[start:end]
    return target


def collate(examples: Sequence[Example], *, loss_on: Literal["answers", "all"] = "answers", pad_id: int = 0,
            packed: bool = False) -> dict[str, torch.Tensor]:
    """Batch examples for next-token training: ``labels[t]`` is the target of the logits at ``t``.

    ``loss_on="answers"`` keeps only the scored answer tokens (the usual recipe for synthetic
    recall); ``"all"`` trains on every next token. Padded: ``input_ids``/``labels`` (B, Lmax) with
    padding ignored. ``packed=True``: one row (1, T) plus ``cu_seqlens`` — no token attends across
    examples and no label crosses a boundary.
    """
    rows = [ex.ids for ex in examples]
    labels = [next_token_targets(ex, loss_on) for ex in examples]
    if packed:
        lengths = torch.tensor([0] + [len(r) for r in rows])
        return {"input_ids": torch.tensor([t for r in rows for t in r]).unsqueeze(0),
                "labels": torch.tensor([t for r in labels for t in r]).unsqueeze(0),
                "cu_seqlens": lengths.cumsum(0).to(torch.int32)}
    width = max(len(r) for r in rows)
    return {"input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels])}
