"""The decode GEMVs as one Triton kernel for decode-sized inputs (a few rows).

At batch 1 a block is a few weight reads, and through cuBLAS each is its own GEMV kernel, plus a
kernel for the residual add + RMSNorm in front and the SwiGLU gate behind. This kernel streams the
weights once and does the rest around them:

- ``NORM``: the block's residual add and RMSNorm as the prologue. Every program needs the whole
  normed row, so each first walks the row once for its sum of squares (d_model elements: a few KiB,
  next to the BLOCK_N × d_model weight rows it reads) and then norms each slice of it as the weight
  tiles stream past; program 0 writes the new stream.
- ``GATED``: two weights side by side, then ``silu(x wᵀ) * (x w_upᵀ)`` (SwiGLU's w1, w3 and gate).
- ``STACKED``: three weights one after another along the output (attention's q, k and v).

Each program owns ``BLOCK_N`` output units and streams its weight rows over d_model, each tile used
by every row of x (at most ``MAX_ROWS``). Roundings are the reference's
(hybridlm/kernels/decode_gemv/reference.py): the stream in its dtype, the normed row in the stream's
dtype then the weights', each projection accumulated in fp32 and rounded to the dtype, silu in fp32
rounded, then the product; only the sums are ordered differently. ``torch.library`` custom ops
(opaque to ``torch.compile``, capturable in a CUDA graph); no backward (inference only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.decode_gemv import MAX_ROWS
from hybridlm.kernels.pdl import launch_options, let_next_launch, wait_for_previous
from hybridlm.kernels.pdl import usable as pdl_usable
from hybridlm.kernels.tickets import tickets as kernel_tickets
from hybridlm.kernels.mamba3.triton.interpreter_compat import (device_type_reason, dtypes_reason, interpreting,
                                                                  one_dtype_reason)

# The fastest of benchmarks/gemv.py --sweep's 24 configs on an H200 (2026-12-03, docs/benchmarks.md):
# SwiGLU's 2048 -> 2 x 4096 at 1 row 13.5 us (0.90 of copy bandwidth) and at 16 rows 14.9 us; rows on
# CUDA cores were 16.1 us at 1 row but 5x slower at 8-16 rows (a row at a time through every tile).
BLOCK_N = 32  # output units a program: 128 programs at the hybrid's hidden 4,096, 208 at the Transformer's 6,656
BLOCK_K = 256
NUM_WARPS = 4
TENSOR_CORES = True  # x through tl.dot as a 16-row tile, or row by row on CUDA cores (see the kernel)
MIN_BLOCK_N = 16  # stacked weights halve BLOCK_N down to this until it divides their rows (tl.dot's least N)
NUM_STAGES = 3  # Triton's software pipelining depth of the weight loads (its default on Hopper)
MAX_NORM_ROW = 16384  # one row's norm prologue loads it whole up to this d_model (fp32: 128 values a thread)
# SPLIT_K > 1: SPLIT_K programs share each column block, each streaming 1/SPLIT_K of d_model, so a
# narrow output (out_proj's 2,048: 64 programs of 32) still keeps every SM loading. Each writes its
# fp32 partial sums to a workspace and takes a ticket; the last to arrive adds the partials in a
# fixed order (deterministic: a CUDA graph replays bit for bit) and runs the epilogue.
SPLIT_K = 1
# The plain form's split-K (out_proj, w2, wo: 2,048 outputs are 64 column blocks, half the SMs):
# benchmarks/gemv.py, H200 2026-12-03, 4096 -> 2048 at one row: 8.3 us with 4 against cuBLAS's 9.3-9.5.
PLAIN_SPLIT_K = 4
# > 0: split-K only as far as needed for this many programs (ceil(target / column blocks), at most the
# configured split): a wide weight (Mamba-3's in_proj, 1,084 one-row blocks of 8) then streams whole rows in
# pipelined tiles instead of one 8 KiB tile a program (at split 4 and d_model 2,048 each program loads
# once: PLAIN_IN_PROJ's in_proj ran at ≈ 2.5 TB/s, H200 2026-12-04). 0: the configured split. Untimed.
SPLIT_K_TARGET_PROGRAMS = 0
# A single row (batch-1 decode) on CUDA cores instead: each program streams ONE_ROW_BLOCK_N weight rows
# in ONE_ROW_BLOCK_K-wide tiles, multiply-adds kept per lane over the whole loop and reduced once
# (nothing but loads and FMAs in the loop; small blocks give many programs, so no SM waits on a last
# wave). Off until benchmarks/gemv.py --sweep times it against the tensor-core form.
# Measured in whole steps (benchmarks/decode_profile.py, hybrid-1.5b at batch 1, H200, 2026-12-03): with PDL
# and every GEMV in the kernel, 1.358 ms a step on the tensor-core form, 1.269 ms on this one (its 114-168
# registers leave room for the next kernel's programs while the last ones finish); blocks of 4 or 16 rows
# were slower (1.317, 1.285 ms).
CUDA_CORES_AT_ONE_ROW = True
ONE_ROW_BLOCK_N = 8
ONE_ROW_BLOCK_K = 512
# Hopper and newer. PDL: programmatic dependent launch, so a GEMV's programs start while the kernel
# before it finishes; they wait (griddepcontrol.wait) before they read an activation or write anything
# (1.407 against 1.425 ms a step alone; the one-row form above needs it: 1.306 ms without).
# PREFETCH_L2: each program first asks for all its weight rows at once into L2 (one bulk prefetch a row,
# cp.async.bulk.prefetch.L2), before the wait when PDL is on; measured slower (1.660 against 1.423 ms):
# off, kept for other GPUs to try.
PREFETCH_L2 = False
PDL = True
# PRELOAD_TILES: each program loads its first weight tiles (and w_up's) into registers before the PDL
# wait, then streams the rest after it: the weights are no kernel's output, so with PDL their DRAM round
# trips overlap the previous kernel's last programs instead of following them (8 KiB a tile at the one-row
# blocks, a bounded amount in flight, where PREFETCH_L2 asked L2 for every row at once). Those tiles are
# peeled off the walk (at most the program's own). Measured with one tile (benchmarks/gpu/inference.sh
# choose, H200, 2026-12-05): the step's GEMV time 1,028 -> 968 us, hybrid-1.5b at batch 1 1.22 -> 1.174 ms a
# step. More (a 2,048-wide row block is 4 tiles: all of a program's weights before the wait) not yet timed.
PRELOAD_TILES = 1
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _normed(x, RES, G, W, at, mask, ks, k_in, rstd, HAS_RES: tl.constexpr, dtype):
    """x (the stream's rows at ``at``) plus its residual, normed (rstd per row, broadcast), in W's dtype."""
    if HAS_RES:
        res = tl.load(RES + at, mask=mask, other=0.0).to(dtype)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(dtype)
    g = tl.load(G + ks, mask=k_in, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * rstd * g).to(dtype).to(W.dtype.element_ty)


@triton.jit
def _stream(H, RES, STREAM, at, mask, write, HAS_RES: tl.constexpr, dtype):
    """The stream at ``at`` (h, or h + residual rounded to the stream's dtype, stored to STREAM where
    ``write``), in fp32 for the sum of squares."""
    s = tl.load(H + at, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(RES + at, mask=mask, other=0.0).to(dtype)
        s = (s.to(tl.float32) + res.to(tl.float32)).to(dtype)
        tl.store(STREAM + at, s, mask=mask & write)
    return s.to(tl.float32)


@triton.jit
def _decode_gemv_kernel(H, RES, G, STREAM, W, W_UP, W2, W3, OUT, M, N, N1, N2, K, eps, NORM: tl.constexpr,
                        HAS_RES: tl.constexpr, GATED: tl.constexpr, STACKED: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TENSOR_CORES: tl.constexpr,
                        DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr, WS, TICKETS, K_PER_SPLIT,
                        NORM_ROW: tl.constexpr, PREFETCH_L2: tl.constexpr, PDL: tl.constexpr,
                        PRELOAD: tl.constexpr):
    # Weight tiles (BLOCK_N, BLOCK_K) with d_model last: each weight row is read contiguously.
    # TENSOR_CORES: x as a (ROWS >= 16, BLOCK_K) tile through tl.dot (rows past M are zeros: at batch 1
    # 16x the multiply-adds, but the kernel waits on the weights either way, and Triton pipelines the
    # loads of a dot loop). Otherwise the rows of x go one at a time through the loaded tiles as
    # CUDA-core multiply-adds. benchmarks/gemv.py --sweep times both.
    # STACKED: the output's columns are W's N1 rows, then W2's N2, then W3's N - N1 - N2 (attention's
    # q, k and v); BLOCK_N divides N1 and N2 (_block_n), so a program reads one of the three.
    pid = tl.program_id(0)
    split = tl.program_id(1)  # which 1/SPLIT_K of d_model this program streams (0 without split-K)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    col_in = cols < N
    w_rows = cols  # the rows of the weight this program reads
    if STACKED:
        if pid * BLOCK_N >= N1 + N2:
            W = W3
            w_rows = cols - N1 - N2
        elif pid * BLOCK_N >= N1:
            W = W2
            w_rows = cols - N1
    row_in = rows < M
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    let_next_launch(PDL)  # the next kernel's reads wait for this grid to finish
    if PREFETCH_L2:
        _prefetch_rows(W, w_rows, col_in, K, k_start, k_end)
        if GATED:
            _prefetch_rows(W_UP, w_rows, col_in, K, k_start, k_end)
    preloaded = ()  # weights are no kernel's output: the first PRELOAD tiles may load before the wait
    for i in tl.static_range(PRELOAD):
        preloaded = preloaded + (_weight_tile(W, W_UP, w_rows, col_in, K, k_start + i * BLOCK_K, k_end, BLOCK_K,
                                              GATED),)
    wait_for_previous(PDL)  # everything below reads what the kernels before wrote, or writes
    dtype = H.dtype.element_ty
    rstd = tl.zeros([ROWS], dtype=tl.float32)
    if NORM and NORM_ROW > 0:  # one row: all of it in one load, then one sum of squares
        # (walking it in BLOCK_K steps is a chain of dependent loads every program waits on first)
        # (names of their own: Triton types a name once, and the loop below reuses ks, k_in with BLOCK_K)
        whole = tl.arange(0, NORM_ROW)
        row = _stream(H, RES, STREAM, whole, (whole < K) & (M > 0), (pid == 0) & (split == 0), HAS_RES, dtype)
        rstd += tl.rsqrt(tl.sum(row * row, axis=0) / K + eps)  # row 0's; the tile's padding rows are masked
    elif NORM:  # each row's sum of squares of its stream; program 0 writes the stream
        squares = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            at = rows[:, None] * K + ks[None, :]
            s = _stream(H, RES, STREAM, at, row_in[:, None] & (ks < K)[None, :], (pid == 0) & (split == 0),
                        HAS_RES, dtype)
            squares += tl.sum(s * s, axis=1)
        rstd = tl.rsqrt(squares / K + eps)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    # one row on CUDA cores: products added lane-wise over the whole loop, reduced across lanes once
    lanes = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    lanes_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for i in tl.static_range(PRELOAD):
        acc, acc_up, lanes, lanes_up = _add_tile(
            preloaded[i][0], preloaded[i][1], k_start + i * BLOCK_K, k_end, H, RES, G, W, K, M, rows, row_in, rstd,
            acc, acc_up, lanes, lanes_up, NORM, HAS_RES, GATED, ROWS, BLOCK_K, TENSOR_CORES, DOT_FP32, dtype)
    for k0 in range(k_start + PRELOAD * BLOCK_K, k_end, BLOCK_K):
        w, w_up = _weight_tile(W, W_UP, w_rows, col_in, K, k0, k_end, BLOCK_K, GATED)
        acc, acc_up, lanes, lanes_up = _add_tile(
            w, w_up, k0, k_end, H, RES, G, W, K, M, rows, row_in, rstd, acc, acc_up, lanes, lanes_up,
            NORM, HAS_RES, GATED, ROWS, BLOCK_K, TENSOR_CORES, DOT_FP32, dtype)
    if not TENSOR_CORES and ROWS == 1:
        acc = tl.sum(lanes, axis=1)[None, :]
        acc_up = tl.sum(lanes_up, axis=1)[None, :]
    out_mask = row_in[:, None] & col_in[None, :]
    if SPLIT_K > 1:
        tile = rows[:, None] * N + cols[None, :]
        tl.store(WS + split * M * N + tile, acc, mask=out_mask)
        if GATED:
            tl.store(WS + (SPLIT_K + split) * M * N + tile, acc_up, mask=out_mask)
        tl.debug_barrier()  # every thread's partials issued before the ticket (released by the atomic)
        ticket = tl.atomic_add(TICKETS + pid, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last of the column block: sum the partials in split order
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for part in range(SPLIT_K):
                acc += tl.load(WS + part * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(WS + (SPLIT_K + part) * M * N + tile, mask=out_mask, other=0.0,
                                      cache_modifier=".cg")
            tl.atomic_xchg(TICKETS + pid, 0)  # ready for the next launch (and graph replay)
            _epilogue(acc, acc_up, OUT, rows, cols, N, out_mask, W, GATED)
    else:
        _epilogue(acc, acc_up, OUT, rows, cols, N, out_mask, W, GATED)


@triton.jit
def _weight_tile(W, W_UP, w_rows, col_in, K, k0, k_end, BLOCK_K: tl.constexpr, GATED: tl.constexpr):
    """The program's weight rows over d_model's [k0, k0 + BLOCK_K) (zeros past k_end), and W_UP's when GATED."""
    ks = k0 + tl.arange(0, BLOCK_K)
    w_at = w_rows[:, None].to(tl.int64) * K + ks[None, :]
    w_mask = col_in[:, None] & (ks < k_end)[None, :]
    w = tl.load(W + w_at, mask=w_mask, other=0.0)
    w_up = w
    if GATED:
        w_up = tl.load(W_UP + w_at, mask=w_mask, other=0.0)
    return w, w_up


@triton.jit
def _add_tile(w, w_up, k0, k_end, H, RES, G, W, K, M, rows, row_in, rstd, acc, acc_up, lanes, lanes_up,
              NORM: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_K: tl.constexpr, TENSOR_CORES: tl.constexpr, DOT_FP32: tl.constexpr, dtype: tl.constexpr):
    """One weight tile (columns [k0, k0 + BLOCK_K)) times the rows of x (normed when NORM), added to the
    sums of the kernel's form: acc/acc_up through tl.dot, lanes/lanes_up for one row on CUDA cores, or
    acc/acc_up a row at a time."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_in = ks < k_end
    if TENSOR_CORES:
        at = rows[:, None] * K + ks[None, :]
        mask = row_in[:, None] & k_in[None, :]
        x = tl.load(H + at, mask=mask, other=0.0)
        if NORM:
            x = _normed(x, RES, G, W, at, mask, ks[None, :], k_in[None, :], rstd[:, None], HAS_RES, dtype)
        if DOT_FP32:  # fp32 weights, or the interpreter (its bf16 dot is wrong: Triton 3.6)
            x, w = x.to(tl.float32), w.to(tl.float32)
            if GATED:
                w_up = w_up.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee" if DOT_FP32 else None)
        if GATED:
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision="ieee" if DOT_FP32 else None)
    elif ROWS == 1:
        x = tl.load(H + ks, mask=k_in & (M > 0), other=0.0)
        if NORM:
            x = _normed(x, RES, G, W, ks, k_in, ks, k_in, tl.sum(rstd, axis=0), HAS_RES, dtype)
        x = x.to(tl.float32)[None, :]
        lanes += w.to(tl.float32) * x
        if GATED:
            lanes_up += w_up.to(tl.float32) * x
    else:
        for r in tl.static_range(ROWS):
            x_in = k_in & (r < M)
            x = tl.load(H + r * K + ks, mask=x_in, other=0.0)
            if NORM:
                rstd_r = tl.sum(tl.where(rows == r, rstd, 0.0), axis=0)
                x = _normed(x, RES, G, W, r * K + ks, x_in, ks, k_in, rstd_r, HAS_RES, dtype)
            x = x.to(tl.float32)[None, :]
            here = (rows == r)[:, None]
            acc = tl.where(here, acc + tl.sum(w.to(tl.float32) * x, axis=1)[None, :], acc)
            if GATED:
                acc_up = tl.where(here, acc_up + tl.sum(w_up.to(tl.float32) * x, axis=1)[None, :], acc_up)
    return acc, acc_up, lanes, lanes_up


@triton.jit
def _prefetch_rows(W, w_rows, col_in, K, k_start, k_end):
    """Ask L2 for d_model's [k_start, k_end) of each of this program's weight rows, one bulk prefetch a
    row (rows past the weight ask for the program's first row again). 16-byte aligned: _launch checks."""
    first = tl.min(w_rows, axis=0)
    at = W + tl.where(col_in, w_rows, first).to(tl.int64) * K + k_start
    nbytes = ((k_end - k_start) * W.dtype.element_ty.primitive_bitwidth // 8).to(tl.int32) + tl.zeros_like(w_rows)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r", [at, nbytes],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _epilogue(acc, acc_up, OUT, rows, cols, N, out_mask, W, GATED: tl.constexpr):
    """The fp32 sums rounded to W's dtype as the reference rounds them; SwiGLU's gate when GATED."""
    w_dtype = W.dtype.element_ty
    out = acc.to(w_dtype)
    if GATED:
        g = out.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(w_dtype).to(tl.float32)
        out = (silu * acc_up.to(w_dtype).to(tl.float32)).to(w_dtype)
    tl.store(OUT + rows[:, None] * N + cols[None, :], out, mask=out_mask)


def _block_n(stacked_rows: tuple[int, ...], block_n: int | None = None) -> int:
    """``block_n`` (default BLOCK_N), halved (not below MIN_BLOCK_N) until it divides every stacked
    weight's rows: a program reads one weight (a model with 4 kv heads of 64 has k and v of 256 rows,
    a tiny one of 16)."""
    block_n = BLOCK_N if block_n is None else block_n
    while block_n > MIN_BLOCK_N and any(n % block_n for n in stacked_rows):
        block_n //= 2
    return block_n


def _split_k(configured: int, k: int, block_k: int, blocks: int) -> tuple[int, int]:
    """(programs a column block, d_model columns each): ``configured``, fewer where ``SPLIT_K_TARGET_PROGRAMS``
    is met with fewer, and none without a slice of d_model."""
    split_k = configured
    if SPLIT_K_TARGET_PROGRAMS > 0:
        split_k = min(split_k, triton.cdiv(SPLIT_K_TARGET_PROGRAMS, blocks))
    split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return triton.cdiv(k, k_per_split), k_per_split


def _launch(h: Tensor, residual: Tensor | None, norm_weight: Tensor | None, eps: float, w: Tensor,
            w_up: Tensor | None, stream: Tensor | None, w2: Tensor | None = None, w3: Tensor | None = None) -> Tensor:
    rows, k = h.shape
    n1 = w.shape[0]
    n2 = 0 if w2 is None else w2.shape[0]
    n = n1 + n2 + (0 if w3 is None else w3.shape[0])
    out = torch.empty(rows, n, device=h.device, dtype=w.dtype)
    one_row = rows == 1 and (CUDA_CORES_AT_ONE_ROW or not TENSOR_CORES)  # a row on CUDA cores: its own blocks
    tensor_cores = TENSOR_CORES and not one_row
    block_k = ONE_ROW_BLOCK_K if one_row else BLOCK_K
    block_n = _block_n((n1, n2) if w2 is not None else (), ONE_ROW_BLOCK_N if one_row else BLOCK_N)
    blocks = triton.cdiv(n, block_n)
    plain = norm_weight is None and w_up is None and w2 is None
    split_k, k_per_split = _split_k(PLAIN_SPLIT_K if plain else SPLIT_K, k, block_k, blocks)
    workspace = tickets = out
    if split_k > 1:
        workspace = torch.empty((2 if w_up is not None else 1) * split_k * rows * n, device=h.device,
                                dtype=torch.float32)
        tickets = kernel_tickets(h.device, blocks, "decode_gemv")
    hopper = (PDL or PREFETCH_L2) and pdl_usable(h.device)  # both need Hopper, compiled
    if rows and n:
        _decode_gemv_kernel[(blocks, split_k)](
            h, h if residual is None else residual, w if norm_weight is None else norm_weight,
            h if stream is None else stream, w, w if w_up is None else w_up, w if w2 is None else w2,
            w if w3 is None else w3, out, rows, n, n1, n2, k, eps,
            NORM=norm_weight is not None, HAS_RES=residual is not None, GATED=w_up is not None,
            STACKED=w2 is not None, ROWS=max(triton.next_power_of_2(rows), 16 if tensor_cores else 1),
            BLOCK_N=block_n, BLOCK_K=block_k, TENSOR_CORES=tensor_cores,
            DOT_FP32=w.dtype == torch.float32 or interpreting(), SPLIT_K=split_k, WS=workspace, TICKETS=tickets,
            K_PER_SPLIT=k_per_split, NORM_ROW=_norm_row(rows, k),
            PREFETCH_L2=PREFETCH_L2 and hopper and _prefetchable(k, k_per_split, w, w_up, w2, w3),
            PDL=PDL and hopper, PRELOAD=min(PRELOAD_TILES, triton.cdiv(k_per_split, block_k)), num_warps=NUM_WARPS,
            num_stages=NUM_STAGES,
            **launch_options(PDL and hopper))
    return out


def _prefetchable(k: int, k_per_split: int, *weights: Tensor | None) -> bool:
    """Bulk prefetches take 16-byte aligned addresses and sizes: every row's slice must be."""
    return all(w is None or (w.data_ptr() % 16 == 0 and k * w.element_size() % 16 == 0
                             and k_per_split * w.element_size() % 16 == 0) for w in weights)


def _norm_row(rows: int, k: int) -> int:
    """The norm prologue's block for one row (the whole row at once), or 0 (walk it in BLOCK_K steps)."""
    return triton.next_power_of_2(k) if rows == 1 and k <= MAX_NORM_ROW else 0


@torch.library.custom_op("hybridlm::silu_mul_gemv", mutates_args=())
def silu_mul_gemv_op(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """x (rows <= MAX_ROWS, K), w1 and w3 (N, K), all contiguous and of one dtype -> (rows, N)."""
    return _launch(x, None, None, 0.0, w1, w3, None)


@silu_mul_gemv_op.register_fake
def _(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w1.shape[0])


def _width(w: Tensor, w2: Tensor | None, w3: Tensor | None) -> int:
    return w.shape[0] + sum(t.shape[0] for t in (w2, w3) if t is not None)


@torch.library.custom_op("hybridlm::rms_norm_gemv", mutates_args=())
def rms_norm_gemv_op(h: Tensor, norm_weight: Tensor, eps: float, w: Tensor, w_up: Tensor | None,
                     w2: Tensor | None, w3: Tensor | None) -> Tensor:
    """h (rows <= MAX_ROWS, K) -> the GEMV of rms_norm(h) (w's rows, or w, w2 and w3's stacked, or
    the gated pair w, w_up): (rows, N) in w's dtype."""
    return _launch(h, None, norm_weight, eps, w, w_up, None, w2, w3)


@rms_norm_gemv_op.register_fake
def _(h, norm_weight, eps, w, w_up, w2, w3):
    return h.new_empty(h.shape[0], _width(w, w2, w3), dtype=w.dtype)


@torch.library.custom_op("hybridlm::add_rms_norm_gemv", mutates_args=())
def add_rms_norm_gemv_op(h: Tensor, residual: Tensor, norm_weight: Tensor, eps: float, w: Tensor,
                         w_up: Tensor | None, w2: Tensor | None, w3: Tensor | None) -> tuple[Tensor, Tensor]:
    """As :func:`rms_norm_gemv_op` of the stream h + residual; returns (the GEMV, the stream)."""
    stream = torch.empty_like(h)
    return _launch(h, residual, norm_weight, eps, w, w_up, stream, w2, w3), stream


@add_rms_norm_gemv_op.register_fake
def _(h, residual, norm_weight, eps, w, w_up, w2, w3):
    return h.new_empty(h.shape[0], _width(w, w2, w3), dtype=w.dtype), torch.empty_like(h)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor) -> Tensor:
    """As :func:`hybridlm.kernels.decode_gemv.reference.silu_mul_gemv`, in one kernel."""
    return silu_mul_gemv_op(_rows(x), w1.contiguous(), w3.contiguous()).view(*x.shape[:-1], w1.shape[0])


def norm_gemv(h: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w: Tensor,
              w_up: Tensor | None = None, stacked: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """As :func:`hybridlm.kernels.decode_gemv.reference.norm_gemv`, in one kernel."""
    w2, w3 = (None, None) if stacked is None else (t.contiguous() for t in stacked)
    shape = (*h.shape[:-1], _width(w, w2, w3))
    weights = (norm_weight.contiguous(), float(eps), w.contiguous(), None if w_up is None else w_up.contiguous(),
               w2, w3)
    if residual is None:
        return rms_norm_gemv_op(_rows(h), *weights).view(shape), h
    out, stream = add_rms_norm_gemv_op(_rows(h), _rows(residual), *weights)
    return out.view(shape), stream.view(h.shape)


@torch.library.custom_op("hybridlm::gemv", mutates_args=())
def gemv_op(x: Tensor, w: Tensor) -> Tensor:
    """x (rows <= MAX_ROWS, K), w (N, K), contiguous, of one dtype -> x wᵀ (rows, N)."""
    return _launch(x, None, None, 0.0, w, None, None)


@gemv_op.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """As :func:`hybridlm.kernels.decode_gemv.reference.gemv`: the kernel's plain form (no norm, one weight)."""
    return gemv_op(_rows(x), w.contiguous()).view(*x.shape[:-1], w.shape[0])


def unsupported_reason(device: torch.device, op: str, dtypes: tuple[torch.dtype | None, ...], rows: int,
                       stacked_rows: tuple[int, ...] = ()) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can. ``dtypes``: for
    ``silu_mul_gemv`` (x, w1, w3), one dtype; for ``norm_gemv`` (stream, residual, norm weight, w,
    w_up, w2, w3; None where absent): the weights of one dtype, the stream and residual any of the
    kernel's. ``stacked_rows``: the rows of w and w2 when w, w2, w3 are stacked (multiples of MIN_BLOCK_N)."""
    where = device_type_reason(device, "the Triton decode GEMV kernel")
    if where:
        return where
    if op == "norm_gemv":
        problem = (one_dtype_reason(tuple(d for d in dtypes[2:] if d is not None), DTYPES)
                   or dtypes_reason(dtypes[:2], DTYPES))
    else:
        problem = one_dtype_reason(dtypes, DTYPES)
    if problem:
        return problem
    if any(n % _block_n(stacked_rows) for n in stacked_rows):
        return f"stacked weights of {', '.join(map(str, stacked_rows))} rows (multiples of {MIN_BLOCK_N})"
    return None if rows <= MAX_ROWS else f"{rows} rows (a decode-sized input takes at most {MAX_ROWS})"
