"""Rotary position embedding of attention's q and k in plain PyTorch: the reference every backend
is held to, and the differentiable path training takes."""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.mamba3.shared import rotate_half_pairs
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


@torch.library.custom_op("hybridlm::rope_cos_sin", mutates_args=())
def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, double: bool) -> tuple[Tensor, Tensor]:
    """cos and sin of :func:`rope_angles` (positions.shape + (head_dim/2,)), fp32 (fp64 if ``double``).

    An op of its own, opaque to torch.compile, so the table is made once a layer call and read by
    the rotations: traced as plain ops, Inductor fused the angles, the power and cos/sin into the
    kernels that rotate q and k, recomputing them for every element of every head (the kernels that
    did so took about a fifth of a Transformer training step's GPU time on an H200, 2026-12-04
    profile, docs/benchmarks.md)."""
    ang = rope_angles(positions, head_dim, theta, torch.float64 if double else torch.float32)
    return ang.cos(), ang.sin()


@rope_cos_sin.register_fake
def _(positions, head_dim, theta, double):
    shape, dtype = (*positions.shape, head_dim // 2), torch.float64 if double else torch.float32
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def rope_qk(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """q (..., Hq, D), k (..., Hk, D) rotated by their tokens' ``positions`` (q's leading shape, or
    broadcastable to it), pairs (i, i + D/2), in fp32 (fp64 for fp64 inputs), returned in q's and
    k's dtypes."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], theta, upcast(q).dtype == torch.float64)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (rotate_half_pairs(upcast(q), cos, sin).to(q.dtype), rotate_half_pairs(upcast(k), cos, sin).to(k.dtype))
