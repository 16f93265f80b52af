"""Rotary position embedding of attention's q and k in one op.

    q, k = rope_qk(q, k, positions, theta)     # q (..., Hq, D), k (..., Hk, D), positions q.shape[:-2]

Pairs (i, i + D/2) of every head rotate by ``position · theta^(-2i/D)``, in fp32. The plain-torch
form is about thirty ops a layer (the angles, cos and sin, the halves, their products, a cat for
each of q and k), most of a Transformer decode step's kernels.

Backends (kind ``rope``, op ``rope_qk``), chosen by :mod:`hybridlm.kernels.registry`:
``reference`` (``reference.py``; every device and dtype; differentiable) and ``triton``
(``triton.py``: one kernel; ``auto`` on CUDA, on the CPU under ``TRITON_INTERPRET=1`` when asked for
by name). The Triton op has no backward, so while autograd records (grad mode on and an input
that requires grad) the reference runs: training is unchanged.
"""
from __future__ import annotations

from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.rope import reference

KIND = "rope"
OP = "rope_qk"

registry.register_reference_and_triton(KIND, OP, reference.rope_qk, "hybridlm.kernels.rope.triton", "rope_qk")


def rope_qk(q: Tensor, k: Tensor, positions: Tensor, theta: float, *,
            backend: str | None = None) -> tuple[Tensor, Tensor]:
    """q (..., Hq, D) and k (..., Hk, D), same leading shape, rotated by ``positions`` (q's leading
    shape, or broadcastable to it). ``backend``: a registered ``rope`` backend, None or ``"auto"``."""
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} and k {tuple(k.shape)} need the same leading shape and head_dim")
    if registry.records_autograd(q, k):
        return reference.rope_qk(q, k, positions, theta)
    name = registry.choose(KIND, OP, backend, q.device.type, q.device.index, (q.dtype, k.dtype), q.shape[-1])
    return registry.implementation(KIND, name, OP)(q, k, positions, theta)


__all__ = ["rope_qk", "KIND", "OP"]
