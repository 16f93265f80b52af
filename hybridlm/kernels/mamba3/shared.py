"""Plain-torch pieces shared by the Mamba-3 oracle and the fused kernels' glue: rotation of state
pairs, heads from groups, rank expansion, the output stage, the per-token step scalars, packing,
the short causal convolution, and folding/finishing the recurrent state (docs/mamba3.md).

Shapes follow docs/mamba3.md §6 (the per-token inputs after ``in_proj``):

    q, k        (B, L, R, G, N)   C and B after their RMSNorm, rank-major then group
    x           (B, L, H, P)
    dt, adt     (B, L, H)         Δ = softplus(.) and A·Δ (≤ 0)
    lam         (B, L, H)         λ ∈ [0, 1]: σ(trap logit), or 1 (Euler), or 1/2
    angle_rate  (B, L, S) | None  raw angle projection; ω = π·tanh(angle_rate), shared by heads
    z           (B, L, H, P) | None
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.errors import ShapeError
from hybridlm.kernels.mamba3.contract import Mamba3State, OutNormKind, PairLayout, ScanParams
from hybridlm.kernels.norms import compute_dtype, rms_norm, upcast

TWO_PI = 2 * math.pi


def rotate_pairs(x: Tensor, theta: Tensor, layout: PairLayout) -> Tensor:
    """Rotate S pairs of the last axis of ``x`` (length N) by ``theta`` (last axis S).

    interleaved (SISO): pairs (2i, 2i+1); half (MIMO): pairs (i, i + N/2). Pairs i >= S are unchanged.
    """
    S = theta.shape[-1]
    if S == 0:
        return x
    cos, sin = theta.cos(), theta.sin()
    if layout == "interleaved":
        pairs = x[..., : 2 * S].unflatten(-1, (S, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([rotated, x[..., 2 * S:]], dim=-1)
    if layout == "half":
        return rotate_half_pairs(x, cos, sin)
    raise ValueError(f"unknown pair layout {layout!r} (interleaved | half)")


def rotate_half_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the S pairs (i, i + N/2) of the last axis of ``x`` (length N) by the angles whose
    cos and sin are given (last axis S); pairs i >= S are unchanged."""
    S, half = cos.shape[-1], x.shape[-1] // 2
    a, b = x[..., :S], x[..., half: half + S]
    return torch.cat([a * cos - b * sin, x[..., S:half], a * sin + b * cos, x[..., half + S:]], dim=-1)


def angle_increment(angle_rate: Tensor, dt: Tensor) -> Tensor:
    """δθ = π·tanh(angle_rate)·Δ per head: (..., S) x (..., H) -> (..., H, S)."""
    return math.pi * torch.tanh(angle_rate).unsqueeze(-2) * dt.unsqueeze(-1)


def heads_from_groups(t: Tensor, nheads: int, bias: Tensor | None) -> Tensor:
    """(..., R, G, N) -> (..., R, H, N): head h reads group h // (H/G), then adds its bias (H, R, N)."""
    G = t.shape[-2]
    if nheads % G:
        raise ShapeError(f"ngroups ({G}) must divide the number of heads ({nheads})")
    t = t.repeat_interleave(nheads // G, dim=-2)
    if bias is not None:
        t = t + bias.transpose(0, 1).to(t.dtype)
    return t


def expand_ranks(x: Tensor, mimo: Tensor | None, rank: int) -> Tensor:
    """(..., H, P) -> (..., R, H, P): x times the per-rank vector mimo (H, R, P); ones for SISO."""
    if mimo is None:
        return x.unsqueeze(-3).expand(*x.shape[:-2], rank, *x.shape[-2:])
    return x.unsqueeze(-3) * mimo.transpose(0, 1).to(x.dtype)


def mamba3_output(
    y: Tensor,
    z: Tensor | None,
    *,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    norm_weight: Tensor | None = None,
    out_norm: OutNormKind = "none",
    norm_eps: float = 1e-5,
) -> Tensor:
    """Gate, optional RMSNorm, and the rank contraction: y (..., R, H, P) -> (..., H, P).

    ``grouped`` norms take the RMS over each head's P values, ``default`` over all H·P values;
    ``pregate`` normalizes y before multiplying by silu(z), ``postgate`` after.
    """
    R, H, P = y.shape[-3:]
    gate = None
    if z is not None:
        gate = F.silu(expand_ranks(z.to(y.dtype), mimo_z, R))
    w = None if norm_weight is None else norm_weight.view(H, P)

    def norm(t: Tensor, grouped: bool) -> Tensor:
        if grouped:
            return rms_norm(t, w, norm_eps, dims=1)
        flat = rms_norm(t.flatten(-2), None if w is None else w.flatten(), norm_eps, dims=1)
        return flat.unflatten(-1, (H, P))

    if out_norm == "none":
        o = y if gate is None else y * gate
    elif out_norm.startswith("pregate"):
        o = norm(y, out_norm.endswith("grouped"))
        o = o if gate is None else o * gate
    elif out_norm.startswith("postgate"):
        o = norm(y if gate is None else y * gate, out_norm.endswith("grouped"))
    else:
        raise ValueError(f"unknown out_norm {out_norm!r}")
    if mimo_o is None:
        return o.sum(dim=-3) if R > 1 else o.squeeze(-3)
    return (o * mimo_o.transpose(0, 1).to(o.dtype)).sum(dim=-3)


def output_stage(y: Tensor, z: Tensor | None, params: ScanParams) -> Tensor:
    """:func:`mamba3_output` with the layer's parameters and switches from ``params``."""
    return mamba3_output(y, z, mimo_z=params.mimo_z, mimo_o=params.mimo_o, norm_weight=params.norm_weight,
                         out_norm=params.out_norm, norm_eps=params.norm_eps)


def fp32_state_reason(state: Mamba3State, kernel: str) -> str | None:
    """Why a fused step cannot update ``state`` in place (None when it can): the step kernels keep
    the SSM state and the angle in fp32."""
    if state.ssm.dtype != torch.float32 or state.angle.dtype != torch.float32:
        return f"state dtype {state.ssm.dtype}; {kernel} keeps an fp32 state"
    return None


def fp32_contiguous(t: Tensor | None) -> Tensor | None:
    """A parameter as the fused kernels read it: fp32, contiguous (None stays None)."""
    return None if t is None else t.float().contiguous()


def zero_state(batch: int, nheads: int, headdim: int, d_state: int, n_angles: int, rank: int,
               device=None, dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None) -> Mamba3State:
    kv_dtype = kv_dtype or dtype
    return Mamba3State(
        angle=torch.zeros(batch, nheads, n_angles, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype),
        ssm=torch.zeros(batch, nheads, headdim, d_state, device=device, dtype=dtype),
        k=torch.zeros(batch, rank, nheads, d_state, device=device, dtype=kv_dtype),
        v=torch.zeros(batch, nheads, headdim, device=device, dtype=kv_dtype),
    )


def check_shapes(q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor,
                  angle_rate: Tensor | None) -> None:
    if q.dim() != 5 or q.shape != k.shape:
        raise ShapeError(f"q and k must both be (batch, seq, rank, groups, d_state); got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if x.dim() != 4 or x.shape[:2] != q.shape[:2]:
        raise ShapeError(f"x must be (batch, seq, heads, headdim) matching q; got {tuple(x.shape)}")
    for name, t in (("dt", dt), ("adt", adt), ("lam", lam)):
        if t.shape != x.shape[:3]:
            raise ShapeError(f"{name} must be (batch, seq, heads) = {tuple(x.shape[:3])}; got {tuple(t.shape)}")
    if angle_rate is not None and (angle_rate.dim() != 3 or angle_rate.shape[:2] != x.shape[:2]):
        raise ShapeError(f"angle_rate must be (batch, seq, n_angles); got {tuple(angle_rate.shape)}")


def heavy_tail(x: Tensor) -> Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, C¹ (docs/mamba3.md §2.1)."""
    return 1 + F.relu(x) + (1 / (1 - x.clamp(max=0)) - 1)


def step_scalars(dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor, *, a_activation: str,
                 A_floor: float, discretization: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token, per-head Δ, A·Δ and λ from their projections (docs/mamba3.md §2.1), in fp32 (fp64 stays)."""
    dt = F.softplus(upcast(dd_dt) + dt_bias)
    a_map = heavy_tail if a_activation == "heavy_tail" else F.softplus
    A = -torch.clamp(a_map(upcast(dd_a)), min=A_floor)
    if trap is not None:
        lam = torch.sigmoid(upcast(trap))
    else:
        lam = torch.full_like(dt, 1.0 if discretization == "euler" else 0.5)
    return dt, A * dt, lam


def seq_lengths(cu_seqlens: Tensor) -> Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def pack_to_padded(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(1, T, ...) -> (NS, Lmax, ...), zero past each sequence's end."""
    lengths = seq_lengths(cu_seqlens)
    lmax = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(lmax, device=t.device)
    valid = pos[None, :] < lengths[:, None]
    idx = (cu_seqlens[:-1, None].long() + pos[None, :]).clamp(max=max(t.shape[1] - 1, 0))
    out = t[0][idx]
    mask = valid.view(*valid.shape, *([1] * (t.dim() - 2)))
    return torch.where(mask, out, torch.zeros((), dtype=t.dtype, device=t.device))


def padded_to_pack(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(NS, Lmax, ...) -> (1, T, ...): the inverse of :func:`pack_to_padded`."""
    lengths = seq_lengths(cu_seqlens)
    valid = torch.arange(t.shape[1], device=t.device)[None, :] < lengths[:, None]
    return t[valid].unsqueeze(0)


def check_cu_seqlens(cu_seqlens: Tensor, total: int, batch: int, *, values: bool = True) -> None:
    """Raise ShapeError on a malformed ``cu_seqlens``; ``values=False`` skips the checks of its
    values, which read it on the host (a sync the fused kernels' glue avoids)."""
    if batch != 1:
        raise ShapeError(f"packed input (cu_seqlens given) must have batch size 1; got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ShapeError("cu_seqlens must be a 1-D tensor [0, end_1, ..., end_n]")
    if not values:
        return
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ShapeError(f"cu_seqlens must start at 0, never decrease and end at the packed length {total}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                  return_final_state: bool = False):
    """Depthwise causal convolution. x (B, L, C); weight (C, K); state (B, K-1, C): the last K-1
    inputs before x. Packed input restarts at every sequence (its state rows are per sequence)."""
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        lengths = seq_lengths(cu_seqlens)
        y, final = _conv_dense(pack_to_padded(x, cu_seqlens), weight, bias, initial_state, lengths)
        y = padded_to_pack(y, cu_seqlens)
    else:
        lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        y, final = _conv_dense(x, weight, bias, initial_state, lengths)
    return (y, final) if return_final_state else y


def _conv_dense(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
                lengths: Tensor) -> tuple[Tensor, Tensor]:
    B, L, C = x.shape
    K = weight.shape[-1]
    cd = compute_dtype(x, weight)
    if initial_state is None:
        initial_state = x.new_zeros(B, K - 1, C)
    xp = torch.cat([initial_state.to(cd), x.to(cd)], dim=1)  # (B, K-1+L, C)
    w = weight.to(cd)
    y = sum(w[:, j] * xp[:, j: j + L] for j in range(K))
    if bias is not None:
        y = y + bias.to(cd)
    # The state after each row's last valid token: the K-1 inputs ending there.
    idx = lengths[:, None] + torch.arange(K - 1, device=x.device)[None, :]
    final = xp.gather(1, idx[..., None].expand(B, K - 1, C))
    return y.to(x.dtype), final.to(initial_state.dtype)


def fold_initial_state(state: Mamba3State, pending: Tensor, mimo_x: Tensor | None, rank: int,
                       dtype: torch.dtype) -> Tensor:
    """The SSM state entering a sequence's first token with that token's β-term folded in.

    ``pending`` (NS, H) is (1 − λ₀)·Δ₀ of each sequence's first token (0 for an empty one): the
    trapezoid rule's weight on the previous token's v ⊗ k, which ``state`` still carries."""
    prev_v = expand_ranks(state.v.to(dtype), None if mimo_x is None else mimo_x.to(dtype), rank)
    return state.ssm.to(dtype) + pending.to(dtype)[..., None, None] * torch.einsum(
        "srhp,srhn->shpn", prev_v, state.k.to(dtype))


def keep_state_where_empty(final: Mamba3State, start: Mamba3State, empty: Tensor) -> Mamba3State:
    """``final``, with ``start``'s rows where a sequence had no token (its state passes through)."""
    return Mamba3State(*(torch.where(empty.view(-1, *([1] * (f.dim() - 1))), s.to(f.dtype), f)
                         for f, s in zip(final, start)))
