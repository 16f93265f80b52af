"""The chunk scan as a pair of ``torch.library`` custom ops over the Triton kernels.

Inputs are packed (T = Σ lengths tokens) and already in kernel form: q, k (T, R, G, N) after
their RMSNorm; biases (H, R, N) fp32; theta (T, H, S) the cumulative angle; v (T, R, H, P) — or, with
``mimo_x`` (H, R, P) fp32, x (T, 1, H, P), which the kernels expand to the R ranks as they load it; A·Δ,
γ and scale (T, H) fp32; ssm0 (NS, H, P, N) the state entering each sequence with the pending
β-term folded in. Output: the pre-gate y (T, R, H, P) in v's dtype (D·v included) and the final
state (fp32).

Custom ops (not an autograd.Function around raw launches) so that ``torch.compile`` treats the
kernels as opaque calls with fake-tensor shapes instead of tracing into Triton's launcher
(pytorch#128061, #146129), and selective activation checkpointing can name them (SAC_SAVE_OPS).
Op schemas take tensors and plain scalars only, so the layout and spec travel flattened: every
size the kernels need is a shape of an argument, except the chunk length, the pair layout and
the matmul dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from hybridlm.kernels.mamba3.triton.chunk_bwd import scan_backward
from hybridlm.kernels.mamba3.triton.chunk_fwd import scan_forward
from hybridlm.kernels.mamba3.triton.layout import ChunkLayout
from hybridlm.kernels.mamba3.triton.spec import ScanSpec


def _spec(q: Tensor, v: Tensor, theta: Tensor, cu_seqlens: Tensor, cu_chunks: Tensor, chunk_seq: Tensor,
          chunk_start: Tensor, chunk: int, interleaved: bool, matmul_dtype: torch.dtype) -> ScanSpec:
    """The ScanSpec the kernels take, rebuilt from the op's flattened arguments (only the grid
    fields of the layout: the per-sequence token indices belong to the caller)."""
    layout = ChunkLayout(chunk=chunk, n_seqs=cu_seqlens.numel() - 1, n_chunks=chunk_seq.numel(),
                         cu_seqlens=cu_seqlens, cu_chunks=cu_chunks, chunk_seq=chunk_seq, chunk_start=chunk_start,
                         last_token=None, empty=None, nonempty_last_token=None, has_empty=False)
    T, R, G, N = q.shape
    return ScanSpec(layout=layout, rank=R, n_groups=G, n_heads=v.shape[2], d_state=N, headdim=v.shape[3],
                    n_angles=theta.shape[-1], interleaved=interleaved, matmul_dtype=matmul_dtype)


def _absent(like: Tensor) -> Tensor:
    """Stands for a gradient the op does not produce (op schemas cannot return None)."""
    return like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("hybridlm::mamba3_chunk_fwd", mutates_args=())
def chunk_fwd(q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, theta: Tensor, v: Tensor,
              adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None, ssm0: Tensor | None,
              mimo_x: Tensor | None, cu_seqlens: Tensor, cu_chunks: Tensor, chunk_seq: Tensor, chunk_start: Tensor,
              chunk: int, interleaved: bool, matmul_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """y (T, R, H, P), the states entering every chunk (n_chunks, H, P, N) in the matmul dtype
    (saved for the backward), and the final state (NS, H, P, N) fp32."""
    spec = _spec(q, v, theta, cu_seqlens, cu_chunks, chunk_seq, chunk_start, chunk, interleaved, matmul_dtype)
    return scan_forward(spec, q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0, mimo_x)


@chunk_fwd.register_fake
def _(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0, mimo_x, cu_seqlens, cu_chunks, chunk_seq,
      chunk_start, chunk, interleaved, matmul_dtype):
    T, _, H, P = v.shape
    R, N = q.shape[1], q.shape[-1]
    return (v.new_empty(T, R, H, P), v.new_empty(chunk_seq.shape[0], H, P, N, dtype=matmul_dtype),
            v.new_empty(cu_seqlens.shape[0] - 1, H, P, N, dtype=torch.float32))


@torch.library.custom_op("hybridlm::mamba3_chunk_bwd", mutates_args=())
def chunk_bwd(q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, theta: Tensor, v: Tensor,
              adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None, mimo_x: Tensor | None, states: Tensor,
              dy: Tensor, dfinal: Tensor | None, cu_seqlens: Tensor, cu_chunks: Tensor, chunk_seq: Tensor,
              chunk_start: Tensor, chunk: int, interleaved: bool, matmul_dtype: torch.dtype,
              need_dssm0: bool) -> list[Tensor]:
    """[dq, dk (T, R, G, N) in q's dtype, dq_bias, dk_bias (H, R, N) fp32, dθ (T, H, S), dv (v's
    dtype and shape), dA·Δ, dγ, d scale (T, H), dD (H,), dssm0 (NS, H, P, N), d mimo_x (H, R, P)], all but
    dq, dk, dv fp32. The bias gradients without biases, dD without D, dssm0 unless ``need_dssm0`` and
    d mimo_x without ``mimo_x`` are empty placeholders."""
    spec = _spec(q, v, theta, cu_seqlens, cu_chunks, chunk_seq, chunk_start, chunk, interleaved, matmul_dtype)
    saved = dict(q=q, k=k, q_bias=q_bias, k_bias=k_bias, theta=theta, v=v, adt=adt, gamma=gamma, scale=scale, D=D,
                 states=states, mimo_x=mimo_x)
    g = scan_backward(spec, saved, dy, dfinal, need_dssm0=need_dssm0)
    return [g["dq"].to(q.dtype), g["dk"].to(k.dtype),
            *(g[n] if g[n] is not None else _absent(q) for n in ("dq_bias", "dk_bias")),
            g["dtheta"], g["dv"], g["dadt"], g["dgamma"], g["dscale"], g["dD"] if g["dD"] is not None else _absent(q),
            g["dssm0"] if g["dssm0"] is not None else _absent(q),
            g["dmimo_x"] if g["dmimo_x"] is not None else _absent(q)]


@chunk_bwd.register_fake
def _(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, mimo_x, states, dy, dfinal, cu_seqlens, cu_chunks,
      chunk_seq, chunk_start, chunk, interleaved, matmul_dtype, need_dssm0):
    T, _, H, P = v.shape
    R, N = q.shape[1], q.shape[-1]
    f32 = dict(dtype=torch.float32)
    bias = (lambda b: q.new_empty(H, R, N, **f32) if b is not None else _absent(q))
    return [q.new_empty(q.shape), k.new_empty(k.shape), bias(q_bias), bias(k_bias), theta.new_empty(T, H, theta.shape[-1], **f32),
            v.new_empty(v.shape), *(adt.new_empty(T, H, **f32) for _ in range(3)),
            adt.new_empty(H, **f32) if D is not None else _absent(q),
            adt.new_empty(cu_seqlens.shape[0] - 1, H, P, N, **f32) if need_dssm0 else _absent(q),
            mimo_x.new_empty(mimo_x.shape, **f32) if mimo_x is not None else _absent(q)]


_GRID_ARGS = ("cu_seqlens", "cu_chunks", "chunk_seq", "chunk_start", "chunk", "interleaved", "matmul_dtype")


def _setup_context(ctx, inputs, output):
    (q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0, mimo_x, *grid) = inputs
    ctx.save_for_backward(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, mimo_x, output[1], *grid[:4])
    ctx.scalars = tuple(grid[4:])
    ctx.has_ssm0 = ssm0 is not None
    # the saved states output never has a gradient: without this autograd fills one with zeros every backward
    # (n_chunks × H × P × N, 41 µs of an H100 layer step at B 8, L 2K, d_state 64; profile of 2026-12-05)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy: Tensor | None, dstates: Tensor | None, dfinal: Tensor | None):
    q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, mimo_x, states, *grid = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(v.shape[0], q.shape[1], *v.shape[2:], dtype=v.dtype, device=v.device)
    else:
        dy = dy.to(v.dtype).contiguous()
    dfinal = None if dfinal is None else dfinal.float().contiguous()
    need_dssm0 = ctx.has_ssm0 and ctx.needs_input_grad[10]
    (dq, dk, dq_bias, dk_bias, dtheta, dv, dadt, dgamma, dscale, dD, dssm0, dmimo_x) = chunk_bwd(
        q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, mimo_x, states, dy, dfinal, *grid, *ctx.scalars,
        need_dssm0)
    return (dq, dk, dq_bias if q_bias is not None else None, dk_bias if k_bias is not None else None, dtheta, dv,
            dadt, dgamma, dscale, dD if D is not None and ctx.needs_input_grad[9] else None,
            dssm0 if need_dssm0 else None, dmimo_x.to(mimo_x.dtype) if mimo_x is not None else None
            ) + (None,) * len(_GRID_ARGS)


chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


def chunk_scan(q: Tensor, k: Tensor, q_bias: Tensor | None, k_bias: Tensor | None, theta: Tensor, v: Tensor,
               adt: Tensor, gamma: Tensor, scale: Tensor, D: Tensor | None, ssm0: Tensor | None,
               spec: ScanSpec, mimo_x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y (T, R, H, P) and the final state (NS, H, P, N): the forward op with the spec flattened
    (``mimo_x``: v is x (T, 1, H, P), expanded in the kernels)."""
    lay = spec.layout
    y, _, final = chunk_fwd(q, k, q_bias, k_bias, theta, v, adt, gamma, scale, D, ssm0, mimo_x, lay.cu_seqlens,
                            lay.cu_chunks, lay.chunk_seq, lay.chunk_start, lay.chunk, spec.interleaved,
                            spec.matmul_dtype)
    return y, final
