"""The chunk scan as one autograd Function over the Triton kernels.

Inputs are packed (T = Σ lengths tokens) and already in kernel form: q, k (T, R, G, N) after
their RMSNorm; biases (H, R, N) fp32; theta (T, H, S) the cumulative angle; v (T, R, H, P); A·Δ,
γ and scale (T, H) fp32; ssm0 (NS, H, P, N) the state entering each sequence with the pending
β-term folded in. Output: the pre-gate y (T, R, H, P) in v's dtype (D·v included) and the final
state (fp32).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.triton.chunk_bwd import scan_backward
from hybridlm.kernels.triton.chunk_fwd import scan_forward
from hybridlm.kernels.triton.spec import ScanSpec


class ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, theta: Tensor, v: Tensor,
                adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None, ssm0: Tensor | None, spec: ScanSpec):
        y, states, final = scan_forward(spec, q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0)
        ctx.save_for_backward(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, states)
        ctx.spec = spec
        ctx.has_ssm0 = ssm0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dy: Tensor | None, dfinal: Tensor | None):
        spec: ScanSpec = ctx.spec
        names = ("q", "k", "q_bias", "k_bias", "theta", "v", "adt", "gamma", "scale", "D", "states")
        saved = dict(zip(names, ctx.saved_tensors))
        v, D = saved["v"], saved["D"]
        dy = torch.zeros(v.shape, dtype=v.dtype, device=v.device) if dy is None else dy.to(v.dtype).contiguous()
        g = scan_backward(spec, saved, dy, None if dfinal is None else dfinal.float().contiguous(),
                          need_dssm0=ctx.has_ssm0 and ctx.needs_input_grad[10])
        dD = g["dD"] if D is not None and ctx.needs_input_grad[9] else None
        return (g["dq"].to(saved["q"].dtype), g["dk"].to(saved["k"].dtype), g["dq_bias"], g["dk_bias"],
                g["dtheta"], g["dv"], g["dadt"], g["dgamma"], g["dscale"], dD, g["dssm0"], None)
