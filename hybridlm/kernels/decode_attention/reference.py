"""A decode step's attention over the KV cache in plain PyTorch: the reference the Triton kernel is
held to (fp32 scores and softmax, or the inputs' dtype when wider)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *, window: int | None = None,
                     scale: float | None = None, **_) -> Tensor:
    """q (B, 1, H, D); caches (B, max_len, Hkv, D); kv_lengths (B,): row b's query is at position
    kv_lengths[b] - 1 and sees keys 0 .. kv_lengths[b] - 1 (the last ``window`` of them when given).
    -> (B, 1, H, D) in q's dtype."""
    B, _, H, D = q.shape
    group = H // k_cache.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    k = k_cache.to(work).repeat_interleave(group, dim=2)  # (B, T, H, D)
    v = v_cache.to(work).repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bthd->bht", q[:, 0].to(work), k) * (1.0 / math.sqrt(D) if scale is None else scale)
    positions = torch.arange(k_cache.shape[1], device=q.device)
    lengths = kv_lengths.long()[:, None]
    keep = positions[None, :] < lengths
    if window is not None:
        keep &= positions[None, :] >= lengths - window
    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    out = torch.einsum("bht,bthd->bhd", scores.softmax(-1), v)
    return out[:, None].to(q.dtype)
