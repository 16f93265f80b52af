"""Backward, fourth design (``KernelTuning.triton_backward_kernels = 4``, SISO): the official module's split.

docs/benchmarks.md (*Two more backward designs …*) found why the official backward's main kernel issues half the
instructions of ours a token: its reverse walk gets q̄ and k̃ = scale·k̄ ready-made, keeps its operands in shared
memory (tensor descriptors, 2 stages) and reloads a tile in 16 bits for each elementwise use, so no tile is held
twice. This design is that split, written here from the formulas:

1. ``_prepare_kernel`` (one program per 64 tokens and head): q̄ = rot(q + b_q), k̃ = scale · rot(k + b_k) per head
   (T, H, N) in q's dtype, and qk_t = γ_t q̄_t·k̄_t (T, H) fp32. With them a chunk's output is

       y_a = Σ_{b<a} e^{cs_a − cs_b} (q̄_a·k̃_b) v_b + qk_a v_a + e^{cs_a} S_c q̄_a + D v_a,
       S_{c+1} = e^{cs_end} S_c + Σ_b e^{cs_end − cs_b} v_b k̃_bᵀ,

   the per-token scale and γ out of the chunk's C×C work.
2. ``_walk_kernel`` (one program per (sequence, head), chunks last to first, G = dL/dS_{c+1} in registers):

       dk̃_b = Σ_{a>b} e^{cs_a − cs_b} (dy_a·v_b) q̄_a + e^{cs_end − cs_b} Gᵀ v_b
       dq̄_a = Σ_{b<a} e^{cs_a − cs_b} (dy_a·v_b) k̃_b + e^{cs_a} S_cᵀ dy_a
       dv_b = Σ_{a>b} e^{cs_a − cs_b} (q̄_a·k̃_b) dy_a + (qk_b + D) dy_b + e^{cs_end − cs_b} G k̃_b
       dqk_t = dy_t·v_t,  G ← e^{cs_end} G + Σ_a e^{cs_a} dy_a q̄_aᵀ

   and dA·Δ from d cs (intra-chunk, inter-chunk and state terms, reverse-summed in the chunk, plus d cs_end on
   every token). The C×C tiles are indexed [b, a] (source, target), so dk̃ and dv take no transposed operand;
   the operands come by tensor descriptor; dy, v and S_c are reloaded in 16 bits where used elementwise.
3. ``_finish_kernel`` (one program per 64 tokens and head): dk̄ = scale·dk̃ + dqk γ q̄, dq̄ += dqk γ k̄,
   d scale = k̄·dk̃, dγ = dqk q̄·k̄, dθ, and dq̄, dk̄ rotated back (per head, in place); head_sums.py then sums the
   heads of a group and the bias gradients.

q̄ and k̃ are made in the backward (kernel 1), not stored by the forward as the official module does: no extra
activation memory, for one more pass over them. MIMO (whose same-token term is an R × R block, not a vector) takes
the fused design.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.head_sums import head_sums
from hybridlm.kernels.mamba3.triton.rows import chunk_rows, load_pairs, rotated_end, rotated_qk, store_pairs
from hybridlm.kernels.mamba3.triton.spec import ScanSpec

BLOCK_T = 64  # tokens a program of the prepare and finish kernels


@triton.jit
def _prepare_block(Q, K, Q_BIAS, K_BIAS, THETA, QBAR, KTILDE, at_chunk, k_row, at_head, head_row, tok0, n_tokens, h,
                   n_heads, n_angles, d_state, half_n, rows, valid, i0, scale, dot, BLOCK_T: tl.constexpr,
                   BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ROTATE: tl.constexpr):
    qa, qb, ka, kb, _, _ = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, n_tokens, h, n_heads,
                                      n_angles, d_state, half_n, rows, valid, i0, BLOCK_T, 1, BLOCK_PAIRS,
                                      INTERLEAVED, HAS_BIAS, ROTATE)
    store_pairs(QBAR + at_head, head_row, rows, valid, i0, half_n, qa, qb, BLOCK_PAIRS, INTERLEAVED)
    store_pairs(KTILDE + at_head, head_row, rows, valid, i0, half_n, ka * scale, kb * scale, BLOCK_PAIRS,
                INTERLEAVED)
    return dot + tl.sum(qa * ka + qb * kb, 1)


@triton.jit
def _prepare_kernel(Q, K, Q_BIAS, K_BIAS, THETA, SCALE, GAMMA, QBAR, KTILDE, QK, n_tokens,
                    n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
                    BLOCK_T: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    tok0, h = tl.program_id(0) * BLOCK_T, tl.program_id(1)
    rows, _, valid, k_row, at_chunk, _, _ = chunk_rows(tok0, n_tokens, h, heads_per_group, n_groups, d_state,
                                                       headdim, BLOCK_T, 1, 16)
    at_token = tok0.to(tl.int64) * n_heads + h + rows * n_heads
    scale = tl.load(SCALE + at_token, mask=valid, other=0.0)[:, None]
    head_row = n_heads * d_state
    at_head = tok0.to(tl.int64) * head_row + h * d_state
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    rotated = rotated_end(n_angles, half_n, BLOCK_PAIRS)
    for i0 in range(0, rotated, BLOCK_PAIRS):
        dot = _prepare_block(Q, K, Q_BIAS, K_BIAS, THETA, QBAR, KTILDE, at_chunk, k_row, at_head, head_row, tok0,
                             n_tokens, h, n_heads, n_angles, d_state, half_n, rows, valid, i0, scale, dot, BLOCK_T,
                             BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, True)
    for i0 in range(rotated, half_n, BLOCK_PAIRS):
        dot = _prepare_block(Q, K, Q_BIAS, K_BIAS, THETA, QBAR, KTILDE, at_chunk, k_row, at_head, head_row, tok0,
                             n_tokens, h, n_heads, n_angles, d_state, half_n, rows, valid, i0, scale, dot, BLOCK_T,
                             BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, False)
    tl.store(QK + at_token, tl.load(GAMMA + at_token, mask=valid, other=0.0) * dot, mask=valid)


@triton.jit
def _walk_kernel(QBAR, KTILDE, V, DY, ADT, QK, D, STATES, DFINAL,
                 DQBAR, DKTILDE, DV, DQK, DADT, DD, DSSM0, CU_SEQLENS, CU_CHUNKS,
                 v_row, dy_row, n_heads, d_state, headdim,
                 CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, HAS_D: tl.constexpr,
                 HAS_DFINAL: tl.constexpr, NEED_DSSM0: tl.constexpr, MM_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    seq, h = tl.program_id(0), tl.program_id(1)
    start = tl.load(CU_SEQLENS + seq)
    end = tl.load(CU_SEQLENS + seq + 1)
    first = tl.load(CU_CHUNKS + seq)
    n_chunks = tl.load(CU_CHUNKS + seq + 1) - first
    head_row = n_heads * d_state
    # the sequence's rows of head h; a descriptor bounds them at the sequence's end (zeros past it, no stores);
    # at least one row, so that a leading empty sequence makes no empty descriptor (its walk has no chunk)
    rows = tl.maximum(end, 1)
    qbar = tl.make_tensor_descriptor(QBAR + h * d_state, [rows, d_state], [head_row, 1], [CHUNK, BLOCK_N])
    ktilde = tl.make_tensor_descriptor(KTILDE + h * d_state, [rows, d_state], [head_row, 1], [CHUNK, BLOCK_N])
    dqbar = tl.make_tensor_descriptor(DQBAR + h * d_state, [rows, d_state], [head_row, 1], [CHUNK, BLOCK_N])
    dktilde = tl.make_tensor_descriptor(DKTILDE + h * d_state, [rows, d_state], [head_row, 1], [CHUNK, BLOCK_N])
    values = tl.make_tensor_descriptor(V + h * headdim, [rows, headdim], [v_row, 1], [CHUNK, BLOCK_P])
    grads = tl.make_tensor_descriptor(DY + h * headdim, [rows, headdim], [dy_row, 1], [CHUNK, BLOCK_P])
    dvalues = tl.make_tensor_descriptor(DV + h * headdim, [rows, headdim], [n_heads * headdim, 1], [CHUNK, BLOCK_P])
    states = tl.make_tensor_descriptor(STATES, [tl.maximum(first + n_chunks, 1), n_heads, headdim, d_state],
                                       [n_heads * headdim * d_state, headdim * d_state, d_state, 1],
                                       [1, 1, BLOCK_P, BLOCK_N])  # (n_chunks, H, P, N): every axis bounded
    t = tl.arange(0, CHUNK)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    at_seq = (seq.to(tl.int64) * n_heads + h) * headdim * d_state
    state_mask = (p < headdim)[:, None] & (n < d_state)[None, :]
    if HAS_DFINAL:
        grad = tl.load(DFINAL + at_seq + p[:, None] * d_state + n[None, :], mask=state_mask, other=0.0)
    else:
        grad = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    skip = tl.load(D + h) if HAS_D else 0.0
    shared = 0.0  # Σ dy·v over the sequence: its share of dD
    for back in range(n_chunks):
        c = n_chunks - 1 - back
        tok0 = start + c * CHUNK
        valid = t < end - tok0
        at_token = (tok0.to(tl.int64) * n_heads + h) + t * n_heads
        cs = tl.cumsum(tl.load(ADT + at_token, mask=valid, other=0.0), 0)
        cs_end = tl.sum(tl.where(t == CHUNK - 1, cs, 0.0), 0)  # invalid rows add 0: the last valid row's cs
        to_end = tl.exp(cs_end - cs)
        growth = tl.exp(cs)
        q = qbar.load([tok0, 0])
        k = ktilde.load([tok0, 0])
        v = values.load([tok0, 0])
        dy = grads.load([tok0, 0])
        state = tl.reshape(states.load([first + c, h, 0, 0]), [BLOCK_P, BLOCK_N])
        # [b, a] tiles: the decay from source b to target a (a > b), then (P ∘ M)ᵀ and its share of d cs
        decay = tl.where(t[None, :] > t[:, None], tl.exp(tl.minimum(cs[None, :] - cs[:, None], 0.0)), 0.0)
        dp = tl.dot(v, tl.trans(dy), input_precision=PRECISION) * decay
        dweights = dp * tl.dot(k, tl.trans(q), input_precision=PRECISION)
        dcs = tl.sum(dweights, 0) - tl.sum(dweights, 1)
        dk = tl.dot(dp.to(MM_DTYPE), q, input_precision=PRECISION)
        dk += to_end[:, None] * tl.dot(v, grad.to(MM_DTYPE), input_precision=PRECISION)
        dktilde.store([tok0, 0], dk.to(DKTILDE.dtype.element_ty))
        dq = tl.dot(tl.trans(dp.to(MM_DTYPE)), k, input_precision=PRECISION)
        dq += growth[:, None] * tl.dot(dy, state, input_precision=PRECISION)
        dqbar.store([tok0, 0], dq.to(DQBAR.dtype.element_ty))
        intra = (tl.dot(k, tl.trans(q), input_precision=PRECISION) * decay).to(MM_DTYPE)
        k_grad = tl.dot(k, tl.trans(grad.to(MM_DTYPE)), input_precision=PRECISION)  # row b: G k̃_b
        # the elementwise uses: dy, v and S_c again, in 16 bits (no register copy of the operands lives on)
        rows_p = t[:, None] * dy_row + p[None, :]
        pv_mask = valid[:, None] & (p < headdim)[None, :]
        dy_late = tl.load(DY + h * headdim + tok0.to(tl.int64) * dy_row + rows_p, mask=pv_mask, other=0.0,
                          volatile=True)
        v_late = tl.load(V + h * headdim + tok0.to(tl.int64) * v_row + t[:, None] * v_row + p[None, :],
                         mask=pv_mask, other=0.0, volatile=True)
        qk = tl.load(QK + at_token, mask=valid, other=0.0)
        dv = tl.dot(intra, dy, input_precision=PRECISION) + to_end[:, None] * k_grad
        dv += (qk + skip)[:, None] * dy_late.to(tl.float32)
        dvalues.store([tok0, 0], dv.to(DV.dtype.element_ty))
        dqk = tl.reshape(tl.dot(dy_late * v_late, tl.full([BLOCK_P, 1], 1, dtype=dy_late.dtype),
                                input_precision=PRECISION), [CHUNK])  # row sums on the tensor cores
        tl.store(DQK + at_token, dqk, mask=valid)
        shared += tl.sum(dqk, 0)
        # d cs: inter-chunk q̄_a·(e^{cs_a} S_cᵀ dy_a), as (q̄ S_cᵀ)_a·dy_a; the state term e^{cs_end − cs_b} v_b·(G k̃_b)
        dcs += growth * tl.sum(tl.dot(q, tl.trans(state), input_precision=PRECISION) * dy_late.to(tl.float32), 1)
        state_term = to_end * tl.sum(v_late.to(tl.float32) * k_grad, 1)
        state_late = tl.load(STATES + ((first + c).to(tl.int64) * n_heads + h) * headdim * d_state
                             + p[:, None] * d_state + n[None, :], mask=state_mask, other=0.0, volatile=True)
        dcs_end = tl.sum(state_term, 0) + tl.exp(cs_end) * tl.sum(tl.sum(state_late.to(tl.float32) * grad, 1), 0)
        tl.store(DADT + at_token, tl.cumsum(dcs - state_term, 0, reverse=True) + dcs_end, mask=valid)
        grad = tl.exp(cs_end) * grad + tl.dot(tl.trans((dy_late.to(tl.float32) * growth[:, None]).to(MM_DTYPE)), q,
                                              input_precision=PRECISION)
    if HAS_D:
        tl.atomic_add(DD + h, shared, sem="relaxed")
    if NEED_DSSM0:
        tl.store(DSSM0 + at_seq + p[:, None] * d_state + n[None, :], grad, mask=state_mask)


@triton.jit
def _finish_block(Q, K, Q_BIAS, K_BIAS, THETA, DQ, DK, DTHETA, at_chunk, k_row, at_head, head_row, tok0, n_tokens,
                  h, n_heads, n_angles, d_state, half_n, rows, valid, i0, scale, weight, dscale, dot,
                  BLOCK_T: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ROTATE: tl.constexpr):
    qa, qb, ka, kb, cos, sin = rotated_qk(Q, K, Q_BIAS, K_BIAS, THETA, at_chunk, k_row, tok0, n_tokens, h, n_heads,
                                          n_angles, d_state, half_n, rows, valid, i0, BLOCK_T, 1, BLOCK_PAIRS,
                                          INTERLEAVED, HAS_BIAS, ROTATE)
    dqa, dqb = load_pairs(DQ + at_head, head_row, rows, valid, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    dka, dkb = load_pairs(DK + at_head, head_row, rows, valid, i0, half_n, BLOCK_PAIRS, INTERLEAVED)
    dscale += tl.sum(ka * dka + kb * dkb, 1)
    dot += tl.sum(qa * ka + qb * kb, 1)
    dqa += weight * ka
    dqb += weight * kb
    dka = scale * dka + weight * qa
    dkb = scale * dkb + weight * qb
    if ROTATE:
        j = tl.arange(0, BLOCK_PAIRS)
        tl.store((DTHETA + (tok0.to(tl.int64) * n_heads + h) * n_angles + i0)
                 + (rows[:, None] * (n_heads * n_angles) + j[None, :]),
                 dqb * qa - dqa * qb + dkb * ka - dka * kb, mask=valid[:, None] & (j < n_angles - i0)[None, :])
        dqa, dqb = dqa * cos + dqb * sin, dqb * cos - dqa * sin
        dka, dkb = dka * cos + dkb * sin, dkb * cos - dka * sin
    store_pairs(DQ + at_head, head_row, rows, valid, i0, half_n, dqa, dqb, BLOCK_PAIRS, INTERLEAVED)
    store_pairs(DK + at_head, head_row, rows, valid, i0, half_n, dka, dkb, BLOCK_PAIRS, INTERLEAVED)
    return dscale, dot


@triton.jit
def _finish_kernel(Q, K, Q_BIAS, K_BIAS, THETA, SCALE, GAMMA, DQK, DQ, DK, DTHETA, DSCALE, DGAMMA, n_tokens,
                   n_heads, heads_per_group, n_groups, d_state, half_n, headdim, n_angles,
                   BLOCK_T: tl.constexpr, BLOCK_PAIRS: tl.constexpr, INTERLEAVED: tl.constexpr,
                   HAS_BIAS: tl.constexpr):
    """DQ, DK hold dq̄, dk̃ per head (T, H, N) on entry and dq, dk (the gradients of q + b_q, k + b_k) per head
    on exit."""
    tok0, h = tl.program_id(0) * BLOCK_T, tl.program_id(1)
    rows, _, valid, k_row, at_chunk, _, _ = chunk_rows(tok0, n_tokens, h, heads_per_group, n_groups, d_state,
                                                       headdim, BLOCK_T, 1, 16)
    at_token = tok0.to(tl.int64) * n_heads + h + rows * n_heads
    scale = tl.load(SCALE + at_token, mask=valid, other=0.0)[:, None]
    gamma = tl.load(GAMMA + at_token, mask=valid, other=0.0)
    dqk = tl.load(DQK + at_token, mask=valid, other=0.0)
    weight = (dqk * gamma)[:, None]  # the same-token term's weight on k̄ (in dq̄) and q̄ (in dk̄)
    head_row = n_heads * d_state
    at_head = tok0.to(tl.int64) * head_row + h * d_state
    dscale = tl.zeros([BLOCK_T], dtype=tl.float32)
    dot = tl.zeros([BLOCK_T], dtype=tl.float32)
    rotated = rotated_end(n_angles, half_n, BLOCK_PAIRS)
    for i0 in range(0, rotated, BLOCK_PAIRS):
        dscale, dot = _finish_block(Q, K, Q_BIAS, K_BIAS, THETA, DQ, DK, DTHETA, at_chunk, k_row, at_head, head_row,
                                    tok0, n_tokens, h, n_heads, n_angles, d_state, half_n, rows, valid, i0, scale,
                                    weight, dscale, dot, BLOCK_T, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, True)
    for i0 in range(rotated, half_n, BLOCK_PAIRS):
        dscale, dot = _finish_block(Q, K, Q_BIAS, K_BIAS, THETA, DQ, DK, DTHETA, at_chunk, k_row, at_head, head_row,
                                    tok0, n_tokens, h, n_heads, n_angles, d_state, half_n, rows, valid, i0, scale,
                                    weight, dscale, dot, BLOCK_T, BLOCK_PAIRS, INTERLEAVED, HAS_BIAS, False)
    tl.store(DSCALE + at_token, dscale, mask=valid)
    tl.store(DGAMMA + at_token, dqk * dot, mask=valid)


def _descriptor_scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the tensor descriptors a kernel makes on the device (Triton asks for it by size)."""
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def walk_backward(spec: ScanSpec, saved: dict, dy: Tensor, dfinal: Tensor | None, need_dssm0: bool) -> dict:
    """The gradients of a SISO chunk scan, the dict of chunk_bwd.scan_backward, in four launches (prepare, walk,
    finish, the group and bias sums)."""
    lay = spec.layout
    q, k, q_bias, k_bias = saved["q"], saved["k"], saved["q_bias"], saved["k_bias"]
    theta, v, adt, gamma, scale, D, states = (saved[n] for n in ("theta", "v", "adt", "gamma", "scale", "D", "states"))
    T, H, P, N, S = q.shape[0], spec.n_heads, spec.headdim, spec.d_state, spec.n_angles
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    has_bias = k_bias is not None
    qb, kb = (q_bias, k_bias) if has_bias else (q, k)
    v = v[:, 0]  # (T, H, P)
    if v.stride(-1) != 1 or v.stride(1) != P or (v.stride(0) * v.element_size()) % 16 or v.data_ptr() % 16:
        v = v.contiguous()  # a descriptor's rows: unit inner stride, a 16-byte aligned start and row stride
    dy = dy[:, 0]
    qbar = torch.empty(T, H, N, device=dev, dtype=q.dtype)
    ktilde = torch.empty(T, H, N, device=dev, dtype=q.dtype)
    qk, dqk = torch.empty(T, H, **f32), torch.empty(T, H, **f32)
    dq_heads = torch.empty(T, 1, H, N, device=dev, dtype=q.dtype)  # dq̄, dk̃, then dq, dk per head
    dk_heads = torch.empty(T, 1, H, N, device=dev, dtype=q.dtype)
    dv = torch.empty(T, 1, H, P, device=dev, dtype=v.dtype)
    dtheta = torch.empty(T, H, S, **f32)
    dadt, dgamma, dscale = (torch.empty(T, H, **f32) for _ in range(3))
    dD = torch.zeros(H, **f32) if D is not None else None
    dssm0 = torch.empty(lay.n_seqs, H, P, N, **f32) if need_dssm0 else None
    rotation = dict(BLOCK_T=BLOCK_T, BLOCK_PAIRS=spec.block_pairs, INTERLEAVED=spec.interleaved, HAS_BIAS=has_bias)
    consts = spec.constexprs()
    token_grid = (triton.cdiv(T, BLOCK_T), H)
    if T:
        _prepare_kernel[token_grid](q, k, qb, kb, theta, scale, gamma, qbar, ktilde, qk, T, *spec.dims(), **rotation)
    if lay.n_seqs:
        triton.set_allocator(_descriptor_scratch)
        _walk_kernel[(lay.n_seqs, H)](
            qbar, ktilde, v, dy, adt, qk, D if D is not None else adt, states, dfinal if dfinal is not None else adt,
            dq_heads, dk_heads, dv, dqk, dadt, dD if D is not None else adt, dssm0 if need_dssm0 else adt,
            lay.cu_seqlens, lay.cu_chunks, v.stride(0), dy.stride(0), H, N, P, CHUNK=lay.chunk,
            BLOCK_N=triton.next_power_of_2(N), BLOCK_P=spec.block_p, HAS_D=D is not None,
            HAS_DFINAL=dfinal is not None, NEED_DSSM0=need_dssm0, MM_DTYPE=consts["MM_DTYPE"],
            PRECISION=consts["PRECISION"], num_warps=4,
            num_stages=1 if spec.matmul_dtype == torch.float32 else 2)  # fp32 tiles: 296 KB of shared memory at 2
    if T:
        _finish_kernel[token_grid](q, k, qb, kb, theta, scale, gamma, dqk, dq_heads, dk_heads, dtheta, dscale, dgamma,
                                   T, *spec.dims(), **rotation)
    dq, dk, dq_bias, dk_bias = head_sums(dq_heads, dk_heads, spec.n_groups, has_bias, spec.knobs)
    return dict(dq=dq, dk=dk, dq_bias=dq_bias, dk_bias=dk_bias, dtheta=dtheta, dv=dv, dadt=dadt, dgamma=dgamma,
                dscale=dscale, dD=dD, dssm0=dssm0, dmimo_x=None)
