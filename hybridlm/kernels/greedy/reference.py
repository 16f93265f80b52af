"""Greedy choice in plain PyTorch: the first index of each row's maximum, exactly as ``argmax(-1)``
(ties go to the first index; a row with a NaN picks its first NaN, as torch does)."""
from __future__ import annotations

import torch
from torch import Tensor

# Vocabularies at least this wide take the two-stage form on CUDA: a (1, V) argmax is one thread block
# walking V, 29 µs at V = 128K on an H200 (2026-12-03, benchmarks/decode_profile.py).
SPLIT_FROM = 1 << 14


def argmax(logits: Tensor, out: Tensor | None = None, *, split: bool | None = None) -> Tensor:
    """logits (B, V) -> (B,) int64 (written into ``out`` when given). For wide vocabularies on CUDA
    (``split`` None) the rows go in up to 256 chunks: the chunks' maxima in parallel, then the first chunk
    holding the row's maximum; the first index within it is the first overall, so the result is argmax's."""
    B, V = logits.shape
    chunks = 256
    while chunks > 1 and V % chunks:
        chunks //= 2
    if split is None:
        split = logits.is_cuda and V >= SPLIT_FROM
    if not split or chunks < 16:
        found = logits.argmax(dim=-1)
    else:
        best, within = logits.reshape(B, chunks, V // chunks).max(dim=-1)
        chunk = best.argmax(dim=-1, keepdim=True)
        found = (chunk * (V // chunks) + within.gather(-1, chunk)).squeeze(-1)
    if out is None:
        return found
    return out.copy_(found)
