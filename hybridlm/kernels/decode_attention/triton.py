"""A decode step's attention over the KV cache as one Triton kernel with split-KV (flash-decoding).

At batch 1 a decode step has one query a head: a kernel with a program per (row, kv head) walks the
whole cache in a few programs and leaves most SMs idle (FA4 on Hopper: 27 µs for a 2K-token cache
of 4 MiB, and it has no split-KV on SM 9.0). Here the cache positions are cut into ``splits``
slices: a program takes one (row, kv head, slice) and all the query heads of that kv head (GQA) as
one tile through ``tl.dot``, keeps the online softmax's running max, sum and weighted values in
fp32, and writes them; the last program of a (row, kv head) to arrive (a ticket, as in the decode
GEMV's split-K) combines the slices in a fixed order and writes the output, so a CUDA graph replays
bit for bit. Slices past a row's length (read on the device: no host sync) do nothing.

Row b's query sits at position lengths[b] - 1 and sees keys 0 .. lengths[b] - 1 (within ``window``
when given). Scores in fp32 (exp2 with the scale folded into log2 e), probabilities rounded to the
values' dtype for the second product as FlashAttention does. A ``torch.library`` custom op (opaque
to ``torch.compile``, capturable in a CUDA graph); no backward (inference only).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, interpreting
from hybridlm.kernels.pdl import launch_options, let_next_launch, wait_for_previous
from hybridlm.kernels.pdl import usable as pdl_usable
from hybridlm.kernels.tickets import tickets as kernel_tickets

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_KEYS = 64  # cache positions a loop iteration reads
NUM_WARPS = 8  # ptxas for sm_90 (benchmarks/kernel_report.py --decode-attention): 200 registers, no spills;
NUM_STAGES = 3  # 4 warps spilled (255 registers) at 64 keys
# Slices: enough programs to keep every SM loading (rows x kv heads x slices >= PROGRAMS_PER_SM x SMs),
# but no slice shorter than MIN_SLICE positions (a slice's fixed cost is its partial's write and read).
PROGRAMS_PER_SM = 2
MIN_SLICE = 128
MAX_HEAD_DIM = 256
PDL = False  # launched with PDL on Hopper+ (hybridlm/kernels/pdl.py); knob ATTENTION_PDL, off until timed
_SM_COUNT: dict[int, int] = {}


@triton.jit
def _decode_attention_kernel(Q, K, V, LENGTHS, OUT, PART_ACC, PART_STATS, TICKETS, scale_log2, window,
                             stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             stride_ob, stride_oh, n_kv_heads, slice_len, splits,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_FP32: tl.constexpr,
                             PDL: tl.constexpr):
    let_next_launch(PDL)
    wait_for_previous(PDL)  # q, the cache and the lengths are the kernel before's writes
    pid = tl.program_id(0)  # row * n_kv_heads + kv head
    part = tl.program_id(1)  # which slice of the cache
    b = pid // n_kv_heads
    kvh = pid % n_kv_heads
    heads = kvh * GROUP + tl.arange(0, GROUP_PAD)  # the query heads that read this kv head
    head_in = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_in[:, None], other=0.0)
    length = tl.load(LENGTHS + b)
    lo = part * slice_len
    hi = tl.minimum(lo + slice_len, length)
    if HAS_WINDOW:
        lo = tl.maximum(lo, length - window)
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    if DOT_FP32:
        q = q.to(tl.float32)
    for start in range(lo, hi, BLOCK_KEYS):  # the first key of every block is inside [lo, hi)
        keys = start + tl.arange(0, BLOCK_KEYS)
        key_in = keys < hi
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kt + dims[None, :], mask=key_in[:, None], other=0.0)
        v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vt + dims[None, :], mask=key_in[:, None], other=0.0)
        if DOT_FP32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee" if DOT_FP32 else None) * scale_log2
        s = tl.where(key_in[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee" if DOT_FP32 else None)
        m = m_new
    # this slice's partial: (max, sum) and the weighted values, for the heads of the group
    group_row = pid * splits + part
    stats_at = PART_STATS + group_row.to(tl.int64) * (2 * GROUP_PAD) + tl.arange(0, GROUP_PAD)
    tl.store(stats_at, m)
    tl.store(stats_at + GROUP_PAD, l_sum)
    acc_at = (PART_ACC + group_row.to(tl.int64) * (GROUP_PAD * HEAD_DIM)
              + tl.arange(0, GROUP_PAD)[:, None] * HEAD_DIM + dims[None, :])
    tl.store(acc_at, acc)
    tl.debug_barrier()  # every thread's partial issued before the ticket (released by the atomic)
    ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel")
    if ticket == splits - 1:  # the last slice of this (row, kv head) to arrive: combine in slice order
        big = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        for i in range(splits):
            at = PART_STATS + (pid * splits + i).to(tl.int64) * (2 * GROUP_PAD) + tl.arange(0, GROUP_PAD)
            big = tl.maximum(big, tl.load(at, cache_modifier=".cg"))
        total = tl.zeros([GROUP_PAD], dtype=tl.float32)
        out = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for i in range(splits):
            row = (pid * splits + i).to(tl.int64)
            at = PART_STATS + row * (2 * GROUP_PAD) + tl.arange(0, GROUP_PAD)
            m_i = tl.load(at, cache_modifier=".cg")
            weight = tl.where(m_i == float("-inf"), 0.0, tl.exp2(m_i - big))  # an empty slice weighs nothing
            total += weight * tl.load(at + GROUP_PAD, cache_modifier=".cg")
            part_acc = tl.load(PART_ACC + row * (GROUP_PAD * HEAD_DIM) + tl.arange(0, GROUP_PAD)[:, None] * HEAD_DIM
                               + dims[None, :], cache_modifier=".cg")
            out += weight[:, None] * part_acc
        out = out / total[:, None]
        tl.atomic_xchg(TICKETS + pid, 0)  # ready for the next launch (and graph replay)
        tl.store(OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(OUT.dtype.element_ty), mask=head_in[:, None])


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few slices, so tests cross slice boundaries
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def slices(batch: int, n_kv_heads: int, max_len: int, device: torch.device) -> tuple[int, int]:
    """(slice length, number of slices) for a cache of ``max_len`` positions: fixed by the shapes
    alone, so a captured graph keeps them."""
    want = max(1, PROGRAMS_PER_SM * _sm_count(device) // max(1, batch * n_kv_heads))
    slice_len = max(MIN_SLICE, triton.cdiv(triton.cdiv(max_len, want), BLOCK_KEYS) * BLOCK_KEYS)
    return slice_len, triton.cdiv(max_len, slice_len)


@torch.library.custom_op("hybridlm::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float,
                        window: int) -> Tensor:
    """q (B, 1, H, D); caches (B, max_len, Hkv, D); lengths (B,) int32 (the query's own key included);
    window <= 0: none. -> (B, 1, H, D) in q's dtype."""
    B, _, H, D = q.shape
    max_len, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = H // n_kv
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot's least M
    out = torch.empty_like(q)
    slice_len, splits = slices(B, n_kv, max_len, q.device)
    part_acc = torch.empty(B * n_kv * splits * group_pad * D, device=q.device, dtype=torch.float32)
    part_stats = torch.empty(B * n_kv * splits * 2 * group_pad, device=q.device, dtype=torch.float32)
    counters = kernel_tickets(q.device, B * n_kv, "decode_attention")
    pdl_on = PDL and pdl_usable(q.device)
    if B and H:
        _decode_attention_kernel[(B * n_kv, splits)](
            q, k_cache, v_cache, lengths, out, part_acc, part_stats, counters, scale * math.log2(math.e), window,
            q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(2),
            n_kv, slice_len, splits, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D, BLOCK_KEYS=BLOCK_KEYS,
            HAS_WINDOW=window > 0, DOT_FP32=q.dtype == torch.float32 or interpreting(), PDL=pdl_on,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES, **launch_options(pdl_on))
    return out


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale, window):
    return torch.empty_like(q)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *, window: int | None = None,
                     scale: float | None = None, **_) -> Tensor:
    """As :func:`hybridlm.kernels.attention.cached_attention` for a decode step (dense, one query a row)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return decode_attention_op(q.contiguous(), k_cache, v_cache, kv_lengths.to(torch.int32), scale,
                               0 if window is None else int(window))


def unsupported_reason(device: torch.device, dtype: torch.dtype, k_dtype: torch.dtype, head_dim: int,
                       aligned: bool = True) -> str | None:
    """Why the kernel cannot take a decode step of these inputs (plain values); None when it can."""
    where = device_type_reason(device, "the Triton decode attention kernel")
    if where:
        return where
    if dtype not in DTYPES or k_dtype != dtype:
        return f"dtypes {dtype}/{k_dtype} (one of float32, bfloat16, float16 for q and the cache)"
    if head_dim > MAX_HEAD_DIM or head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (a power of two from 16 to {MAX_HEAD_DIM})"
    return None
