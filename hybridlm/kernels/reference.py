"""Plain-PyTorch Mamba-3: the ground truth every fused kernel is tested against.

Everything here works on tensors that the module has already projected (docs/mamba3.md §2):

    q, k        (B, L, R, G, N)   C and B after their RMSNorm, rank-major then group
    x           (B, L, H, P)
    dt, adt     (B, L, H)         Δ = softplus(.) and A·Δ (≤ 0)
    lam         (B, L, H)         λ ∈ [0, 1]: σ(trap logit), or 1 (Euler), or 1/2
    angle_rate  (B, L, S) | None  raw angle projection; ω = π·tanh(angle_rate), shared by heads
    z           (B, L, H, P) | None

State (the official decode-cache layout, docs §4.1), one row per sequence:
    angle (B, H, S) cumulative angle, ssm (B, H, P, N), k (B, R, H, N) rotated biased unscaled B of
    the last token, v (B, H, P) raw x of the last token.

Three forms compute the same function and are tested against each other:
    mamba3_step        one token, from and to a state
    mamba3_sequential  the recurrence of §2.5 token by token (a loop of steps)
    mamba3_chunked     the chunked (SSD-style) form of §3, fast enough to train small models on CPU
Arithmetic is float32 (float64 when the inputs are float64); outputs take the dtype of ``x``.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.errors import ShapeError

PairLayout = Literal["interleaved", "half"]
OutNormKind = Literal["none", "pregate_grouped", "pregate_default", "postgate_grouped", "postgate_default"]
TWO_PI = 2 * math.pi


class Mamba3State(NamedTuple):
    angle: Tensor  # (B, H, S)
    ssm: Tensor  # (B, H, P, N)
    k: Tensor  # (B, R, H, N)
    v: Tensor  # (B, H, P)


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(t: Tensor) -> Tensor:
    """At least float32: bf16/fp16 go to fp32, fp32 and fp64 stay."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, dims: int = 1) -> Tensor:
    """RMSNorm over the last ``dims`` axes, computed in fp32 (or fp64) and returned in x's dtype."""
    cd = compute_dtype(x)
    xf = x.to(cd)
    axes = tuple(range(-dims, 0))
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=axes, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(cd)
    return out.to(x.dtype)


def rotate_pairs(x: Tensor, theta: Tensor, layout: PairLayout) -> Tensor:
    """Rotate S pairs of the last axis of ``x`` (length N) by ``theta`` (last axis S).

    interleaved (SISO): pairs (2i, 2i+1); half (MIMO): pairs (i, i + N/2). Pairs i >= S are unchanged.
    """
    S = theta.shape[-1]
    if S == 0:
        return x
    N = x.shape[-1]
    cos, sin = theta.cos(), theta.sin()
    if layout == "interleaved":
        pairs = x[..., : 2 * S].unflatten(-1, (S, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([rotated, x[..., 2 * S:]], dim=-1)
    if layout == "half":
        half = N // 2
        a, b = x[..., :S], x[..., half: half + S]
        return torch.cat([a * cos - b * sin, x[..., S:half], a * sin + b * cos, x[..., half + S:]], dim=-1)
    raise ValueError(f"unknown pair layout {layout!r} (interleaved | half)")


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


def zero_state(batch: int, nheads: int, headdim: int, d_state: int, n_angles: int, rank: int,
               device=None, dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None) -> Mamba3State:
    kv_dtype = kv_dtype or dtype
    return Mamba3State(
        angle=torch.zeros(batch, nheads, n_angles, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype),
        ssm=torch.zeros(batch, nheads, headdim, d_state, device=device, dtype=dtype),
        k=torch.zeros(batch, rank, nheads, d_state, device=device, dtype=kv_dtype),
        v=torch.zeros(batch, nheads, headdim, device=device, dtype=kv_dtype),
    )


def _check_shapes(q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor,
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


# ---------------------------------------------------------------------------------------------
# the step: one token
# ---------------------------------------------------------------------------------------------
def mamba3_step(
    q: Tensor,
    k: Tensor,
    x: Tensor,
    dt: Tensor,
    adt: Tensor,
    lam: Tensor,
    angle_rate: Tensor | None,
    state: Mamba3State,
    *,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    mimo_x: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    norm_weight: Tensor | None = None,
    out_norm: OutNormKind = "none",
    norm_eps: float = 1e-5,
    pair_layout: PairLayout = "interleaved",
) -> tuple[Tensor, Mamba3State]:
    """One token. q, k (B, R, G, N); x, z (B, H, P); dt, adt, lam (B, H); angle_rate (B, S).

    Returns y (B, H, P) and the new state (a new tuple; the input state is not modified).
    The cumulative angle is kept in [0, 2π).
    """
    cd = compute_dtype(q, x, dt, state.ssm)
    B, R, G, N = q.shape
    H, P = x.shape[-2:]
    dt, adt, lam = dt.to(cd), adt.to(cd), lam.to(cd)
    qh = heads_from_groups(q.to(cd), H, q_bias)  # (B, R, H, N)
    kh = heads_from_groups(k.to(cd), H, k_bias)
    theta = state.angle.to(cd)
    if angle_rate is not None and angle_rate.shape[-1] > 0:
        theta = torch.remainder(theta + angle_increment(angle_rate.to(cd), dt), TWO_PI)
    q_rot = rotate_pairs(qh, theta.unsqueeze(1), pair_layout)
    k_rot = rotate_pairs(kh, theta.unsqueeze(1), pair_layout)
    v = expand_ranks(x.to(cd), mimo_x, R)  # (B, R, H, P)
    v_prev = expand_ranks(state.v.to(cd), mimo_x, R)
    alpha = torch.exp(adt)
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt
    ssm = (alpha[..., None, None] * state.ssm.to(cd)
           + beta[..., None, None] * torch.einsum("brhp,brhn->bhpn", v_prev, state.k.to(cd))
           + gamma[..., None, None] * torch.einsum("brhp,brhn->bhpn", v, k_rot))
    y = torch.einsum("bhpn,brhn->brhp", ssm, q_rot)
    if D is not None:
        y = y + D.to(cd)[:, None] * v
    out = mamba3_output(y, None if z is None else z.to(cd), mimo_z=mimo_z, mimo_o=mimo_o,
                        norm_weight=norm_weight, out_norm=out_norm, norm_eps=norm_eps)
    new_state = Mamba3State(
        angle=theta.to(state.angle.dtype), ssm=ssm.to(state.ssm.dtype),
        k=k_rot.to(state.k.dtype), v=x.to(state.v.dtype))
    return out.to(x.dtype), new_state


# ---------------------------------------------------------------------------------------------
# the decode step of a whole layer: from in_proj's output row to out_proj's input
# ---------------------------------------------------------------------------------------------
def heavy_tail(x: Tensor) -> Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, C¹ (docs §2.1 item 3)."""
    return 1 + F.relu(x) + (1 / (1 - x.clamp(max=0)) - 1)


def step_scalars(dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor, *, a_activation: str,
                 A_floor: float, discretization: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token, per-head Δ, A·Δ and λ from their projections (docs §2.1), in fp32 (fp64 stays)."""
    dt = F.softplus(upcast(dd_dt) + dt_bias)
    a_map = heavy_tail if a_activation == "heavy_tail" else F.softplus
    A = -torch.clamp(a_map(upcast(dd_a)), min=A_floor)
    if trap is not None:
        lam = torch.sigmoid(upcast(trap))
    else:
        lam = torch.full_like(dt, 1.0 if discretization == "euler" else 0.5)
    return dt, A * dt, lam


class DecodeLayout(NamedTuple):
    """The static shape of one layer's decode step: how a row of in_proj's output splits, and the
    spec switches. Row order: z, x (H·P each), B, C (R·G·N each), Δ, A (H each), then the
    trapezoid logit (H, trapezoid only) and the angle rates (S, when S > 0)."""

    nheads: int
    headdim: int
    ngroups: int
    rank: int
    d_state: int
    n_angles: int
    discretization: str = "trapezoid"
    a_activation: str = "heavy_tail"
    A_floor: float = 1e-4
    out_norm: OutNormKind = "none"
    norm_eps: float = 1e-5
    bc_norm_eps: float = 1e-5
    pair_layout: PairLayout = "interleaved"

    def split_sizes(self) -> list[int]:
        H, P, W = self.nheads, self.headdim, self.rank * self.ngroups * self.d_state
        sizes = [H * P, H * P, W, W, H, H]
        sizes += [H] if self.discretization == "trapezoid" else []
        return sizes + ([self.n_angles] if self.n_angles else [])


class DecodeParams(NamedTuple):
    """The layer's parameters the step reads (shapes as the module's, docs §1.2)."""

    dt_bias: Tensor  # (H,)
    B_norm: Tensor  # (N,)
    C_norm: Tensor  # (N,)
    D: Tensor  # (H,)
    B_bias: Tensor | None = None  # (H, R, N)
    C_bias: Tensor | None = None
    mimo_x: Tensor | None = None  # (H, R, P)
    mimo_z: Tensor | None = None
    mimo_o: Tensor | None = None
    norm_weight: Tensor | None = None  # (H·P,)


def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """One token of a Mamba-3 layer after in_proj: proj (B, W) -> o (B, H·P), out_proj's input.

    Updates ``state`` in place (fixed shapes, no host sync: a CUDA graph can capture it). B/C stay
    fp32 after their RMSNorm, where the module's prefill rounds them to its dtype.
    """
    H, P, G, R, N = layout.nheads, layout.headdim, layout.ngroups, layout.rank, layout.d_state
    if proj.dim() != 2 or proj.shape[1] != sum(layout.split_sizes()):
        raise ShapeError(f"proj must be (batch, {sum(layout.split_sizes())}); got {tuple(proj.shape)}")
    z, x, b, c, dd_dt, dd_a, *rest = torch.split(proj, layout.split_sizes(), dim=-1)
    trap = rest.pop(0) if layout.discretization == "trapezoid" else None
    angle_rate = upcast(rest.pop(0)) if layout.n_angles else None
    k = rms_norm(upcast(b).unflatten(-1, (R, G, N)), params.B_norm, layout.bc_norm_eps)
    q = rms_norm(upcast(c).unflatten(-1, (R, G, N)), params.C_norm, layout.bc_norm_eps)
    dt, adt, lam = step_scalars(dd_dt, dd_a, trap, params.dt_bias, a_activation=layout.a_activation,
                                A_floor=layout.A_floor, discretization=layout.discretization)
    y, new_state = mamba3_step(
        q, k, x.unflatten(-1, (H, P)), dt, adt, lam, angle_rate, state, q_bias=params.C_bias,
        k_bias=params.B_bias, D=params.D, z=z.unflatten(-1, (H, P)), mimo_x=params.mimo_x, mimo_z=params.mimo_z,
        mimo_o=params.mimo_o, norm_weight=params.norm_weight, out_norm=layout.out_norm,
        norm_eps=layout.norm_eps, pair_layout=layout.pair_layout)
    for dst, src in zip(state, new_state):
        dst.copy_(src)
    return y.flatten(-2)


# ---------------------------------------------------------------------------------------------
# packed sequences <-> padded batch
# ---------------------------------------------------------------------------------------------
def _lengths(cu_seqlens: Tensor) -> Tensor:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def pack_to_padded(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(1, T, ...) -> (NS, Lmax, ...), zero past each sequence's end."""
    lengths = _lengths(cu_seqlens)
    lmax = int(lengths.max()) if lengths.numel() else 0
    pos = torch.arange(lmax, device=t.device)
    valid = pos[None, :] < lengths[:, None]
    idx = (cu_seqlens[:-1, None].long() + pos[None, :]).clamp(max=max(t.shape[1] - 1, 0))
    out = t[0][idx]
    mask = valid.view(*valid.shape, *([1] * (t.dim() - 2)))
    return torch.where(mask, out, torch.zeros((), dtype=t.dtype, device=t.device))


def padded_to_pack(t: Tensor, cu_seqlens: Tensor) -> Tensor:
    """(NS, Lmax, ...) -> (1, T, ...): the inverse of :func:`pack_to_padded`."""
    lengths = _lengths(cu_seqlens)
    valid = torch.arange(t.shape[1], device=t.device)[None, :] < lengths[:, None]
    return t[valid].unsqueeze(0)


def _check_cu_seqlens(cu_seqlens: Tensor, total: int, batch: int) -> None:
    if batch != 1:
        raise ShapeError(f"packed input (cu_seqlens given) must have batch size 1; got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ShapeError("cu_seqlens must be a 1-D tensor [0, end_1, ..., end_n]")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ShapeError(f"cu_seqlens must start at 0, never decrease and end at the packed length {total}")


# ---------------------------------------------------------------------------------------------
# the sequential form: the recurrence token by token (ground truth)
# ---------------------------------------------------------------------------------------------
def mamba3_sequential(
    q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor, angle_rate: Tensor | None,
    *,
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,  # accepted for a uniform signature; unused
    **step_kwargs,
):
    """The exponential-trapezoidal recurrence of docs §2.5, one token at a time."""
    _check_shapes(q, k, x, dt, adt, lam, angle_rate)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        ys, states = [], []
        for i in range(cu_seqlens.numel() - 1):
            s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            init = None if initial_state is None else Mamba3State(*(t[i: i + 1] for t in initial_state))
            sl = slice(s, e)
            kwargs = dict(step_kwargs)
            if kwargs.get("z") is not None:
                kwargs["z"] = kwargs["z"][:, sl]
            y, st = mamba3_sequential(
                q[:, sl], k[:, sl], x[:, sl], dt[:, sl], adt[:, sl], lam[:, sl],
                None if angle_rate is None else angle_rate[:, sl],
                initial_state=init, return_final_state=True, **kwargs)
            ys.append(y)
            states.append(st)
        y = torch.cat(ys, dim=1)
        final = Mamba3State(*(torch.cat(parts, dim=0) for parts in zip(*states)))
        return (y, final) if return_final_state else y

    B, L, R, G, N = q.shape
    H, P = x.shape[-2:]
    S = 0 if angle_rate is None else angle_rate.shape[-1]
    cd = compute_dtype(q, x, dt)
    state = initial_state
    if state is None:
        state = zero_state(B, H, P, N, S, R, device=x.device, dtype=cd)
    ys = []
    for t in range(L):
        y, state = mamba3_step(
            q[:, t], k[:, t], x[:, t], dt[:, t], adt[:, t], lam[:, t],
            None if angle_rate is None else angle_rate[:, t], state,
            z=None if step_kwargs.get("z") is None else step_kwargs["z"][:, t],
            **{key: v for key, v in step_kwargs.items() if key != "z"})
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, H, P)
    return (y, state) if return_final_state else y


# ---------------------------------------------------------------------------------------------
# the chunked form
# ---------------------------------------------------------------------------------------------
def _chunk_scan(q_rot: Tensor, k_rot: Tensor, v: Tensor, dt: Tensor, adt: Tensor, lam: Tensor,
                D: Tensor | None, ssm0: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Chunked scan on a dense batch. q_rot, k_rot (B, L, R, H, N); v (B, L, R, H, P);
    dt, adt, lam (B, L, H); ssm0 (B, H, P, N) the state entering token 0 with the pending
    β-term of token 0 folded in. Returns y (B, L, R, H, P) before the gate, and the final state.

    Token s contributes to token t > s with weight scale_s·exp(A_t − A_s), where
    scale_s = λ_sΔ_s + (1 − λ_{s+1})Δ_{s+1}, and to itself with λ_tΔ_t (docs §2.5 item 13).
    """
    B, L, R, H, N = q_rot.shape
    P = v.shape[-1]
    gamma = lam * dt
    scale = gamma + F.pad(dt[:, 1:] * (1 - lam[:, 1:]), (0, 0, 0, 1))
    nc = -(-L // chunk)
    pad = nc * chunk - L
    if pad:  # padded tokens carry Δ = 0 and A·Δ = 0: they neither decay nor feed the state
        q_rot, k_rot, v = (F.pad(t, (0, 0, 0, 0, 0, 0, 0, pad)) for t in (q_rot, k_rot, v))
        gamma, scale, adt = (F.pad(t, (0, 0, 0, pad)) for t in (gamma, scale, adt))

    # Heads become a batch axis and the (token, rank) pairs of a chunk one axis of length C·R, so
    # that every contraction below is a batched matmul.
    def chunks(t: Tensor) -> Tensor:  # (B, Lp, R, H, X) -> (B, H, nc, C·R, X)
        return t.permute(0, 3, 1, 2, 4).reshape(B, H, nc, chunk * R, t.shape[-1])

    def per_rank(t: Tensor) -> Tensor:  # (..., C) -> (..., C·R): one value per token, for every rank
        return t.repeat_interleave(R, dim=-1) if R > 1 else t

    qc, kc, vc = chunks(q_rot), chunks(k_rot), chunks(v)
    gc, sc, ac = (t.permute(0, 2, 1).reshape(B, H, nc, chunk) for t in (gamma, scale, adt))
    cs = ac.cumsum(dim=-1)  # (B, H, nc, C): A_t − A_{chunk start − 1}

    # within a chunk: token j feeds token i > j with scale_j·e^{cs_i − cs_j}, itself with γ_i
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=cs.device).tril(-1)
    decay = torch.where(strictly_lower, cs.unsqueeze(-1) - cs.unsqueeze(-2), float("-inf")).exp()
    weight = decay * sc.unsqueeze(-2) + torch.diag_embed(gc)  # (B, H, nc, C, C)
    if R > 1:
        weight = weight.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)
    y = ((qc @ kc.transpose(-1, -2)) * weight) @ vc  # (B, H, nc, C·R, P)

    # across chunks: the state entering each chunk
    to_end = per_rank((cs[..., -1:] - cs).exp() * sc)  # (B, H, nc, C·R)
    chunk_states = (vc * to_end.unsqueeze(-1)).transpose(-1, -2) @ kc  # (B, H, nc, P, N)
    chunk_decay = cs[..., -1].exp()  # (B, H, nc)
    ssm = ssm0
    entering = []
    for c in range(nc):
        entering.append(ssm)
        ssm = chunk_decay[:, :, c, None, None] * ssm + chunk_states[:, :, c]
    entering = torch.stack(entering, dim=2)  # (B, H, nc, P, N)
    y = y + per_rank(cs.exp()).unsqueeze(-1) * (qc @ entering.transpose(-1, -2))
    y = y.reshape(B, H, nc, chunk, R, P).permute(0, 2, 3, 4, 1, 5).reshape(B, nc * chunk, R, H, P)[:, :L]
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * v[:, :L]
    return y, ssm


def mamba3_chunked(
    q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor, angle_rate: Tensor | None,
    *,
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    D: Tensor | None = None,
    z: Tensor | None = None,
    mimo_x: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    norm_weight: Tensor | None = None,
    out_norm: OutNormKind = "none",
    norm_eps: float = 1e-5,
    pair_layout: PairLayout = "interleaved",
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
):
    """The chunked form. Same arguments and results as :func:`mamba3_sequential`."""
    _check_shapes(q, k, x, dt, adt, lam, angle_rate)
    if chunk_size < 1:
        raise ShapeError(f"chunk_size must be at least 1; got {chunk_size}")
    packed = cu_seqlens is not None
    if packed:
        _check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        lengths = _lengths(cu_seqlens)
        q, k, x, dt, adt, lam = (pack_to_padded(t, cu_seqlens) for t in (q, k, x, dt, adt, lam))
        angle_rate = None if angle_rate is None else pack_to_padded(angle_rate, cu_seqlens)
        z = None if z is None else pack_to_padded(z, cu_seqlens)
    B, L, R, G, N = q.shape
    H, P = x.shape[-2:]
    S = 0 if angle_rate is None else angle_rate.shape[-1]
    if not packed:
        lengths = torch.full((B,), L, dtype=torch.long, device=x.device)
    cd = compute_dtype(q, x, dt)
    if initial_state is not None and initial_state.ssm.shape[0] != B:
        raise ShapeError(f"initial_state has {initial_state.ssm.shape[0]} rows; expected one per sequence ({B})")

    if L == 0:  # nothing to scan: the state passes through
        out = x.new_zeros(B, 0, H, P)
        if not return_final_state:
            return out
        start = initial_state or zero_state(B, H, P, N, S, R, device=x.device, dtype=cd)
        return out, Mamba3State(*(t.to(cd) for t in start))

    dt_, adt_, lam_ = dt.to(cd), adt.to(cd), lam.to(cd)
    theta0 = torch.zeros(B, H, S, dtype=torch.float64, device=x.device)
    if initial_state is not None:
        theta0 = initial_state.angle.to(torch.float64)
    if S:
        # Accumulate in float64 and reduce mod 2π, so long sequences keep the angle exact.
        theta = torch.remainder(theta0.unsqueeze(1) + angle_increment(angle_rate.to(cd), dt_).to(torch.float64).cumsum(1),
                                TWO_PI).to(cd)  # (B, L, H, S)
    else:
        theta = torch.zeros(B, L, H, 0, dtype=cd, device=x.device)
    q_rot = rotate_pairs(heads_from_groups(q.to(cd), H, q_bias), theta.unsqueeze(2), pair_layout)
    k_rot = rotate_pairs(heads_from_groups(k.to(cd), H, k_bias), theta.unsqueeze(2), pair_layout)
    v = expand_ranks(x.to(cd), mimo_x, R)  # (B, L, R, H, P)

    ssm0 = torch.zeros(B, H, P, N, dtype=cd, device=x.device)
    if initial_state is not None:
        prev_v = expand_ranks(initial_state.v.to(cd), mimo_x, R)
        pending = (1 - lam_[:, 0]) * dt_[:, 0]  # β-term of token 0 without its decay
        ssm0 = initial_state.ssm.to(cd) + pending[..., None, None] * torch.einsum(
            "brhp,brhn->bhpn", prev_v, initial_state.k.to(cd))
    y, ssm = _chunk_scan(q_rot, k_rot, v, dt_, adt_, lam_, D, ssm0, chunk_size)
    out = mamba3_output(y, None if z is None else z.to(cd), mimo_z=mimo_z, mimo_o=mimo_o,
                        norm_weight=norm_weight, out_norm=out_norm, norm_eps=norm_eps).to(x.dtype)
    if packed:
        out = padded_to_pack(out, cu_seqlens)
    if not return_final_state:
        return out

    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(B, device=x.device)
    final = Mamba3State(angle=theta[rows, last],
                        ssm=ssm, k=k_rot[rows, last], v=x[rows, last].to(cd))
    if initial_state is not None or bool((lengths == 0).any()):
        start = initial_state or zero_state(B, H, P, N, S, R, device=x.device, dtype=cd)
        empty = lengths == 0
        final = Mamba3State(*(torch.where(empty.view(-1, *([1] * (f.dim() - 1))), s.to(f.dtype), f)
                              for f, s in zip(final, start)))
    return out, final


# ---------------------------------------------------------------------------------------------
# short causal depthwise convolution (the optional ``conv_kernel`` of the spec)
# ---------------------------------------------------------------------------------------------
def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                  initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                  return_final_state: bool = False):
    """Depthwise causal convolution. x (B, L, C); weight (C, K); state (B, K-1, C): the last K-1
    inputs before x. Packed input restarts at every sequence (its state rows are per sequence)."""
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        lengths = _lengths(cu_seqlens)
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
