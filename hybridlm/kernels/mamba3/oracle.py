"""The plain-PyTorch Mamba-3 oracle: the ground truth every fused kernel is tested against.

Three forms compute the same function and are tested against each other (inputs as in
:mod:`hybridlm.kernels.mamba3.shared`; per-layer parameters in a :class:`ScanParams`):

    mamba3_step         one token, from and to a state
    mamba3_sequential   the recurrence of docs/mamba3.md §2 token by token (a loop of steps)
    mamba3_chunked      the chunked (SSD-style) form of docs/mamba3.md §3, fast enough to train small
                        models on CPU
    mamba3_decode_step  one token of a whole layer, from in_proj's output row (the decode kernels' oracle)

and :func:`mamba3_inputs`, the per-token scan inputs (B/C norms, Δ, A·Δ, λ) from in_proj's segments.

Arithmetic is float32 (float64 when the inputs are float64); outputs take the dtype of ``x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.errors import ShapeError
from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams, Mamba3State, ScanParams
from hybridlm.kernels.mamba3.shared import (TWO_PI, angle_increment, check_cu_seqlens, check_shapes, expand_ranks,
                                            fold_initial_state, heads_from_groups, keep_state_where_empty,
                                            output_stage, pack_to_padded, padded_to_pack, rotate_pairs,
                                            seq_lengths, step_scalars, zero_state)
from hybridlm.kernels.norms import compute_dtype, rms_norm, upcast


def mamba3_step(
    q: Tensor,
    k: Tensor,
    x: Tensor,
    dt: Tensor,
    adt: Tensor,
    lam: Tensor,
    angle_rate: Tensor | None,
    state: Mamba3State,
    params: ScanParams = ScanParams(),
    *,
    z: Tensor | None = None,
) -> tuple[Tensor, Mamba3State]:
    """One token. q, k (B, R, G, N); x, z (B, H, P); dt, adt, lam (B, H); angle_rate (B, S).

    Returns y (B, H, P) and the new state (a new tuple; the input state is not modified).
    The cumulative angle is kept in [0, 2π).
    """
    cd = compute_dtype(q, x, dt, state.ssm)
    mimo_x, pair_layout = params.mimo_x, params.pair_layout
    B, R, G, N = q.shape
    H, P = x.shape[-2:]
    dt, adt, lam = dt.to(cd), adt.to(cd), lam.to(cd)
    qh = heads_from_groups(q.to(cd), H, params.q_bias)  # (B, R, H, N)
    kh = heads_from_groups(k.to(cd), H, params.k_bias)
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
    if params.D is not None:
        y = y + params.D.to(cd)[:, None] * v
    out = output_stage(y, None if z is None else z.to(cd), params)
    new_state = Mamba3State(
        angle=theta.to(state.angle.dtype), ssm=ssm.to(state.ssm.dtype),
        k=k_rot.to(state.k.dtype), v=x.to(state.v.dtype))
    return out.to(x.dtype), new_state


def mamba3_sequential(
    q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor, angle_rate: Tensor | None,
    params: ScanParams = ScanParams(),
    *,
    z: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,  # accepted for a uniform signature; unused
):
    """The exponential-trapezoidal recurrence of docs/mamba3.md §2, one token at a time."""
    check_shapes(q, k, x, dt, adt, lam, angle_rate)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        ys, states = [], []
        for i in range(cu_seqlens.numel() - 1):
            s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            init = None if initial_state is None else Mamba3State(*(t[i: i + 1] for t in initial_state))
            sl = slice(s, e)
            y, st = mamba3_sequential(
                q[:, sl], k[:, sl], x[:, sl], dt[:, sl], adt[:, sl], lam[:, sl],
                None if angle_rate is None else angle_rate[:, sl], params,
                z=None if z is None else z[:, sl], initial_state=init, return_final_state=True)
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
            None if angle_rate is None else angle_rate[:, t], state, params,
            z=None if z is None else z[:, t])
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(B, 0, H, P)
    return (y, state) if return_final_state else y


def _chunk_scan(q_rot: Tensor, k_rot: Tensor, v: Tensor, dt: Tensor, adt: Tensor, lam: Tensor,
                D: Tensor | None, ssm0: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Chunked scan on a dense batch. q_rot, k_rot (B, L, R, H, N); v (B, L, R, H, P);
    dt, adt, lam (B, L, H); ssm0 (B, H, P, N) the state entering token 0 with the pending
    β-term of token 0 folded in. Returns y (B, L, R, H, P) before the gate, and the final state.

    Token s contributes to token t > s with weight scale_s·exp(A_t − A_s), where
    scale_s = λ_sΔ_s + (1 − λ_{s+1})Δ_{s+1}, and to itself with λ_tΔ_t (docs/mamba3.md §3).
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
    params: ScanParams = ScanParams(),
    *,
    z: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    return_final_state: bool = False,
):
    """The chunked form. Same arguments and results as :func:`mamba3_sequential`."""
    check_shapes(q, k, x, dt, adt, lam, angle_rate)
    if chunk_size < 1:
        raise ShapeError(f"chunk_size must be at least 1; got {chunk_size}")
    packed = cu_seqlens is not None
    if packed:
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        lengths = seq_lengths(cu_seqlens)
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
    q_rot = rotate_pairs(heads_from_groups(q.to(cd), H, params.q_bias), theta.unsqueeze(2), params.pair_layout)
    k_rot = rotate_pairs(heads_from_groups(k.to(cd), H, params.k_bias), theta.unsqueeze(2), params.pair_layout)
    v = expand_ranks(x.to(cd), params.mimo_x, R)  # (B, L, R, H, P)

    ssm0 = torch.zeros(B, H, P, N, dtype=cd, device=x.device)
    if initial_state is not None:  # token 0's β-term reads the state's last v and k
        ssm0 = fold_initial_state(initial_state, (1 - lam_[:, 0]) * dt_[:, 0], params.mimo_x, R, cd)
    y, ssm = _chunk_scan(q_rot, k_rot, v, dt_, adt_, lam_, params.D, ssm0, chunk_size)
    out = output_stage(y, None if z is None else z.to(cd), params).to(x.dtype)
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
        final = keep_state_where_empty(final, start, lengths == 0)
    return out, final


def mamba3_inputs(b: Tensor, c: Tensor, dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor,
                  b_norm: Tensor, c_norm: Tensor, *, rank: int, a_activation: str, A_floor: float,
                  discretization: str, b_eps: float, c_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The scan's per-token inputs from in_proj's segments: b, c (..., R·G·N) -> q = C_norm(c), k =
    B_norm(b) (..., R, G, N) in their dtype (the RMSNorms over N with weights ``c_norm``, ``b_norm``);
    dd_dt, dd_a, trap (..., H) -> Δ, A·Δ, λ (..., H) in fp32 (:func:`step_scalars`)."""
    N = b_norm.shape[0]
    rows = (rank, b.shape[-1] // (rank * N), N)
    k = rms_norm(b.unflatten(-1, rows), b_norm, b_eps)
    q = rms_norm(c.unflatten(-1, rows), c_norm, c_eps)
    dt, adt, lam = step_scalars(dd_dt, dd_a, trap, dt_bias, a_activation=a_activation, A_floor=A_floor,
                                discretization=discretization)
    return q, k, dt, adt, lam


def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout) -> Tensor:
    """One token of a Mamba-3 layer after in_proj: proj (B, W) -> o (B, H·P), out_proj's input.

    Updates ``state`` in place (fixed shapes, no host sync: a CUDA graph can capture it). B/C stay
    fp32 after their RMSNorm, where the module's prefill rounds them to its dtype.
    """
    H, P, G, R, N = layout.nheads, layout.headdim, layout.ngroups, layout.rank, layout.d_state
    width = layout.in_proj.width
    if proj.dim() != 2 or proj.shape[1] != width:
        raise ShapeError(f"proj must be (batch, {width}); got {tuple(proj.shape)}")
    seg = layout.in_proj.split(proj)
    z, x = seg["z"], seg["x"]
    angle_rate = upcast(seg["angle"]) if "angle" in seg else None
    k = rms_norm(upcast(seg["B"]).unflatten(-1, (R, G, N)), params.B_norm, layout.bc_norm_eps)
    q = rms_norm(upcast(seg["C"]).unflatten(-1, (R, G, N)), params.C_norm, layout.bc_norm_eps)
    dt, adt, lam = step_scalars(seg["dt"], seg["A"], seg.get("trap"), params.dt_bias,
                                a_activation=layout.a_activation, A_floor=layout.A_floor,
                                discretization=layout.discretization)
    y, new_state = mamba3_step(q, k, x.unflatten(-1, (H, P)), dt, adt, lam, angle_rate, state,
                               ScanParams.from_decode(params, layout), z=z.unflatten(-1, (H, P)))
    for dst, src in zip(state, new_state):
        dst.copy_(src)
    return y.flatten(-2)
