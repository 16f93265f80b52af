"""A decode step's KV-cache write in plain PyTorch: the reference every backend is held to (the ops
attention ran before this kernel existed: positions from the cache lengths, RoPE, two scatters)."""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.rope.reference import rope_qk


def append_kv(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
              theta: float | None) -> tuple[Tensor, Tensor]:
    """q (B, L, Hq, D), k and v (B, L, Hk, D): row b's tokens go to positions lengths[b] .. + L - 1
    of k_cache, v_cache (B, max_len, Hk, D), rotated by those positions first when ``theta`` is
    given (RoPE; None: NoPE); then ``lengths`` advances by L in place. Returns q and k, rotated likewise."""
    L = q.shape[1]
    positions = lengths[:, None].long() + torch.arange(L, device=q.device)  # (B, L)
    if theta is not None:
        q, k = rope_qk(q, k, positions, theta)
    index = positions[:, :, None, None].expand_as(k)
    k_cache.scatter_(1, index, k.to(k_cache.dtype))
    v_cache.scatter_(1, index, v.to(v_cache.dtype))
    lengths.add_(L)
    return q, k
