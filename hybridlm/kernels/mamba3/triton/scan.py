"""``mamba3_chunked`` on the Triton kernels: same signature and results as
:func:`hybridlm.kernels.mamba3.oracle.mamba3_chunked`.

Triton kernels do the per-token walk (the trapezoid weights γ and scale, the cumulative angle),
the chunked scan (rotation of B/C with their biases, the intra-chunk product, the state passing,
D), the MIMO rank expansion of x, and the output stage (gate, grouped norms, rank contraction).
The rest of the glue — folding the initial state, the final k/v states — and the two "default"
output norms (a reduction across heads) run as plain torch ops around them, so autograd chains
everything. Inputs the kernels do not cover fall back to the reference with one
warning that names the reason.
"""
from __future__ import annotations


import torch
from torch import Tensor

from hybridlm.errors import ShapeError
from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import Mamba3State, ScanParams
from hybridlm.kernels.mamba3.shared import (check_cu_seqlens, check_shapes, fold_initial_state,
                                            fp32_contiguous, heads_from_groups, keep_state_where_empty,
                                            output_stage, rotate_pairs, zero_state)
from hybridlm.kernels.mamba3.triton.angles import token_walk_fwd
from hybridlm.kernels.mamba3.triton.core import chunk_scan
from hybridlm.kernels.mamba3.triton.interpreter_compat import device_reason
from hybridlm.kernels.mamba3.triton.layout import dense_layout, kernel_chunk, packed_layout
from hybridlm.kernels.mamba3.triton.output import FUSED_NORMS, gated_output_fwd
from hybridlm.kernels.mamba3.triton.ranks import expand_ranks_fwd
from hybridlm.kernels.mamba3.triton.spec import ScanSpec
from hybridlm.kernels.mamba3.tuning import kernel_tuning
from hybridlm.kernels.registry import warn_once

MAX_D_STATE = 256
MAX_HEADDIM = 128
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(q: Tensor, x: Tensor, angle_rate: Tensor | None) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None when they can."""
    device = device_reason(x, "the Triton kernels")
    if device:
        return device
    for name, t in (("q", q), ("x", x)):
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} is {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
    R, N, P = q.shape[2], q.shape[-1], x.shape[-1]
    if N % 2 or N > MAX_D_STATE:
        return f"d_state {N} (the kernels need an even d_state <= {MAX_D_STATE})"
    if P > MAX_HEADDIM:
        return f"headdim {P} (the kernels take headdim <= {MAX_HEADDIM})"
    if R & (R - 1) or R > 64:
        return f"mimo rank {R} (the kernels take a power of two)"
    if angle_rate is not None and angle_rate.shape[-1] > N // 2:
        return f"{angle_rate.shape[-1]} angle pairs for d_state {N}"
    return None


@torch.compiler.assume_constant_result
def fuse_rank_expansion() -> bool:
    """``KernelTuning.triton_fuse_ranks``, read once while torch.compile traces (a constant of the graph)."""
    return bool(kernel_tuning().triton_fuse_ranks)


def warn_fallback(reason: str) -> None:
    warn_once(f"Mamba-3 Triton backend: falling back to the reference scan: {reason}", stacklevel=4)


def mamba3_chunked(
    q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor, angle_rate: Tensor | None,
    params: ScanParams = ScanParams(),
    *,
    z: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
):
    """The chunked Mamba-3 scan on the Triton kernels (arguments as the oracle's)."""
    check_shapes(q, k, x, dt, adt, lam, angle_rate)
    pair_layout = params.pair_layout
    if pair_layout not in ("interleaved", "half"):
        raise ValueError(f"unknown pair layout {pair_layout!r} (interleaved | half)")
    reason = unsupported_reason(q, x, angle_rate)
    if reason is None and x.shape[1] == 0:
        reason = "empty sequence axis"
    if reason is not None:
        warn_fallback(reason)
        return oracle.mamba3_chunked(q, k, x, dt, adt, lam, angle_rate, params, z=z, initial_state=initial_state,
                                     cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                                     return_final_state=return_final_state)

    B, L, R, G, N = q.shape
    H, P = x.shape[-2:]
    S = 0 if angle_rate is None else angle_rate.shape[-1]
    heads_from_groups(q[:1, :0], H, None)  # raises ShapeError if G does not divide H
    chunk = kernel_chunk(chunk_size, R)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, L, B, values=False)
        layout = packed_layout(cu_seqlens, chunk, L)
    else:
        layout = dense_layout(B, L, chunk, x.device)
    NS, T = layout.n_seqs, B * L
    if initial_state is not None and initial_state.ssm.shape[0] != NS:
        raise ShapeError(f"initial_state has {initial_state.ssm.shape[0]} rows; expected one per sequence ({NS})")

    def tokens(t: Tensor) -> Tensor:  # (B, L, ...) -> (T, ...), last axis contiguous
        t = t.reshape(T, *t.shape[2:])
        return t if t.stride(-1) == 1 else t.contiguous()

    mm_dtype = torch.float32 if x.dtype == torch.float32 and q.dtype == torch.float32 else (
        torch.float16 if torch.float16 in (x.dtype, q.dtype) else torch.bfloat16)
    qf, kf, xf = tokens(q).contiguous(), tokens(k).contiguous(), tokens(x)
    dt_, adt_, lam_ = (tokens(t).float().contiguous() for t in (dt, adt, lam))

    # per-token weights γ_t = λ_tΔ_t, scale_t = γ_t + (1 − λ_{t+1})Δ_{t+1} and the cumulative angle, one walk
    theta0 = None if initial_state is None or not S else initial_state.angle
    gamma, scale, theta = token_walk_fwd(dt_, lam_, tokens(angle_rate) if S else None, theta0, layout.cu_seqlens)

    v = xf.unsqueeze(1)  # (T, R, H, P): SISO reads x in place; MIMO rows must be evenly strided
    mimo_x = None  # given: the kernels expand x to the ranks as they load it (v stays x)
    if R > 1 and params.mimo_x is not None and fuse_rank_expansion():
        mimo_x = fp32_contiguous(params.mimo_x)
    elif params.mimo_x is not None:  # MIMO weights at any rank, R = 1 included (the reference's math)
        v = expand_ranks_fwd(xf, params.mimo_x)
    elif R > 1:
        v = v.expand(T, R, H, P).contiguous()

    ssm0 = None
    if initial_state is not None:  # each sequence's first token's β-term reads the state's last v and k
        first = layout.first_token.clamp(max=max(T - 1, 0))
        pending = ((1 - lam_[first]) * dt_[first]).masked_fill(layout.empty[:, None], 0)  # (NS, H)
        ssm0 = fold_initial_state(initial_state, pending, params.mimo_x, R, torch.float32).contiguous()

    spec = ScanSpec(layout=layout, rank=R, n_groups=G, n_heads=H, d_state=N, headdim=P, n_angles=S,
                    interleaved=pair_layout == "interleaved", matmul_dtype=mm_dtype)
    y, ssm_final = chunk_scan(qf, kf, fp32_contiguous(params.q_bias), fp32_contiguous(params.k_bias), theta, v,
                              adt_, gamma, scale, fp32_contiguous(params.D), ssm0, spec, mimo_x)
    zt = None if z is None else tokens(z)
    out_norm = params.out_norm
    if out_norm in FUSED_NORMS and (out_norm == "none" or params.norm_weight is not None):
        out = gated_output_fwd(y, zt, fp32_contiguous(params.mimo_z), fp32_contiguous(params.mimo_o),
                               params.norm_weight, out_norm, params.norm_eps)
    else:  # the "default" norms reduce over all heads: torch ops
        out = output_stage(y.float(), None if zt is None else zt.float(), params).to(x.dtype)
    out = out.view(B, L, H, P)
    if not return_final_state:
        return out

    last = layout.last_token
    if S:
        angle = theta[last]
    else:
        angle = torch.zeros(NS, H, 0, dtype=torch.float32, device=x.device)
    k_last = heads_from_groups(kf[last].float(), H, params.k_bias)  # (NS, R, H, N)
    final = Mamba3State(angle=angle, ssm=ssm_final,
                        k=rotate_pairs(k_last, angle.unsqueeze(1), pair_layout), v=xf[last].float())
    if initial_state is not None or layout.has_empty:
        start = initial_state or zero_state(NS, H, P, N, S, R, device=x.device, dtype=torch.float32)
        final = keep_state_where_empty(final, start, layout.empty)
    return out, final


