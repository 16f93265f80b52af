"""Rotary position embedding of attention's q and k in plain PyTorch: the reference every backend
is held to, and the differentiable path training takes."""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.mamba3.shared import rotate_pairs
from hybridlm.kernels.norms import upcast


def inverse_frequencies(head_dim: int, theta: float, dtype: torch.dtype, device=None) -> Tensor:
    """(head_dim/2,) frequencies theta^(-2i/head_dim) in ``dtype``."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim)


def rope_angles(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """positions (any shape) -> (..., head_dim/2) angles, frequencies theta^(-2i/head_dim), in ``dtype``.

    The rotation runs in fp32 for bf16/fp16/fp32 activations, so its angles are fp32 too (as in
    Llama): under torch.compile these few ops are fused into the rotation of every q/k element,
    and fp64 powers there cost a Transformer step about 15 % on an H200 (2026-12-02 profile)."""
    return positions.to(dtype)[..., None] * inverse_frequencies(head_dim, theta, dtype, positions.device)


def rope_qk(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """q (..., Hq, D), k (..., Hk, D) rotated by their tokens' ``positions`` (q's leading shape, or
    broadcastable to it), pairs (i, i + D/2), in fp32 (fp64 for fp64 inputs), returned in q's and
    k's dtypes."""
    ang = rope_angles(positions, q.shape[-1], theta, upcast(q).dtype).unsqueeze(-2)  # broadcast over heads
    return rotate_pairs(upcast(q), ang, "half").to(q.dtype), rotate_pairs(upcast(k), ang, "half").to(k.dtype)
