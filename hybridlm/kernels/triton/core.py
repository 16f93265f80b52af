"""The chunk scan as one autograd Function over the Triton kernels.

Inputs are packed (T = Σ lengths tokens) and already in kernel form: q, k (T, R, G, N) after
their RMSNorm; biases (H, R, N); theta (T, H, S) the cumulative angle; v (T, R, H, P); A·Δ, γ and
scale (T, H) fp32; ssm0 (NS, H, P, N) the state entering each sequence with the pending β-term
folded in. Output: the pre-gate y (T, R, H, P) fp32 (D·v included) and the final state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.triton.chunk_bwd import scan_backward
from hybridlm.kernels.triton.chunk_fwd import scan_forward
from hybridlm.kernels.triton.spec import ScanSpec


def _sum_group_heads(per_head: Tensor, n_groups: int) -> Tensor:
    """(T, R, H, N) per-head gradient -> (T, R, G, N): head h reads group h // (H / G)."""
    T, R, H, N = per_head.shape
    return per_head.view(T, R, n_groups, H // n_groups, N).sum(3)


class ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, theta: Tensor, v: Tensor,
                adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None, ssm0: Tensor | None, spec: ScanSpec):
        states_dtype = torch.float32 if spec.matmul_dtype == torch.float32 else spec.matmul_dtype
        y, states, final = scan_forward(spec, q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0,
                                        states_dtype)
        ctx.save_for_backward(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, states)
        ctx.spec = spec
        ctx.has_ssm0 = ssm0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dy: Tensor, dfinal: Tensor | None):
        spec: ScanSpec = ctx.spec
        names = ("q", "k", "q_bias", "k_bias", "theta", "v", "adt", "gamma", "scale", "D", "states")
        saved = dict(zip(names, ctx.saved_tensors))
        if dy is None:
            dy = torch.zeros_like(saved["v"], dtype=torch.float32)
        g = scan_backward(spec, saved, dy.float(), None if dfinal is None else dfinal.float().contiguous(),
                          need_dssm0=ctx.has_ssm0 and ctx.needs_input_grad[10])
        q_bias, k_bias, v, D = saved["q_bias"], saved["k_bias"], saved["v"], saved["D"]
        dq_bias = g["dq"].sum(0).transpose(0, 1) if q_bias is not None and ctx.needs_input_grad[2] else None
        dk_bias = g["dk"].sum(0).transpose(0, 1) if k_bias is not None and ctx.needs_input_grad[3] else None
        dD = None
        if D is not None and ctx.needs_input_grad[9]:
            dD = torch.einsum("trhp,trhp->h", dy.float(), v.float())
        return (_sum_group_heads(g["dq"], spec.n_groups).to(saved["q"].dtype),
                _sum_group_heads(g["dk"], spec.n_groups).to(saved["k"].dtype),
                dq_bias, dk_bias, g["dtheta"], g["dv"].to(v.dtype), g["dadt"], g["dgamma"], g["dscale"],
                dD, g["dssm0"], None)
