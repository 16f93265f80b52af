"""Greedy choice as one Triton kernel: each program takes CHUNK logits of a row and keeps their
maximum and its first index; the row's last program to arrive (a ticket, hybridlm/kernels/tickets.py)
picks the first chunk holding the row's maximum. One launch where the torch form takes five (a
chunked max, an argmax, a gather, a multiply and an add: 14.7 µs of a batch-1 step of hybrid-1.5b on
an H100, 2026-12-05), so a decode step can end with the next token inside its CUDA graph.

Exactly ``argmax(-1)``: ties go to the first index, the partial results are combined in chunk order
(deterministic), and a chunk holding a NaN reports its first NaN (as a negative index), which wins
over every number, as torch's argmax. A ``torch.library`` custom op (capturable in a CUDA graph), no
backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridlm.kernels.mamba3.triton.interpreter_compat import device_type_reason, dtypes_reason
from hybridlm.kernels.tickets import tickets as kernel_tickets

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 2048  # logits a program: 63 programs a row at a 128,256-token vocabulary (4 KiB of bf16 each)
NUM_WARPS = 4


@triton.jit
def _argmax_kernel(LOGITS, OUT, WS_VALUE, WS_INDEX, TICKETS, V, row_stride, CHUNK: tl.constexpr,
                   PARTS: tl.constexpr):
    part = tl.program_id(0)
    row = tl.program_id(1)
    parts = tl.num_programs(0)
    offs = part * CHUNK + tl.arange(0, CHUNK)
    inside = offs < V
    x = tl.load(LOGITS + row.to(tl.int64) * row_stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
    is_nan = x != x
    first_nan = tl.min(tl.where(is_nan & inside, offs, V), axis=0)
    numbers = tl.where(is_nan, float("-inf"), x)
    best = tl.max(numbers, axis=0)
    first_best = tl.min(tl.where((numbers == best) & inside, offs, V), axis=0)
    # a chunk with a NaN reports -(its first NaN + 1): every later step tells the two kinds apart by the sign
    tl.store(WS_VALUE + row * parts + part, best)
    tl.store(WS_INDEX + row * parts + part, tl.where(first_nan < V, -first_nan - 1, first_best))
    tl.debug_barrier()  # the partials issued before the ticket (released by the atomic)
    ticket = tl.atomic_add(TICKETS + row, 1, sem="acq_rel")
    if ticket == parts - 1:  # the row's last chunk to arrive: the first chunk holding the maximum
        ps = tl.arange(0, PARTS)
        taken = ps < parts
        values = tl.load(WS_VALUE + row * parts + ps, mask=taken, other=float("-inf"), cache_modifier=".cg")
        indices = tl.load(WS_INDEX + row * parts + ps, mask=taken, other=0, cache_modifier=".cg")
        nan_part = tl.min(tl.where(taken & (indices < 0), ps, PARTS), axis=0)
        plain = taken & (indices >= 0)
        top = tl.max(tl.where(plain, values, float("-inf")), axis=0)
        top_part = tl.min(tl.where(plain & (values == top), ps, PARTS), axis=0)
        chosen = tl.where(nan_part < PARTS, nan_part, top_part)
        found = tl.sum(tl.where(ps == chosen, indices, 0), axis=0)
        tl.store(OUT + row, tl.where(found < 0, -found - 1, found).to(tl.int64))
        tl.atomic_xchg(TICKETS + row, 0)  # ready for the next launch (and graph replay)


@torch.library.custom_op("hybridlm::argmax_into", mutates_args=("out",))
def argmax_into_op(logits: Tensor, out: Tensor) -> None:
    """logits (B, V) with unit stride along V, out (B,) int64: out[b] = argmax(logits[b])."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    parts = triton.cdiv(vocab, CHUNK)
    values = torch.empty(rows * parts, device=logits.device, dtype=torch.float32)
    indices = torch.empty(rows * parts, device=logits.device, dtype=torch.int32)
    _argmax_kernel[(parts, rows)](logits, out, values, indices, kernel_tickets(logits.device, rows, "greedy"), vocab,
                                  logits.stride(0), CHUNK=CHUNK, PARTS=triton.next_power_of_2(parts),
                                  num_warps=NUM_WARPS)


@argmax_into_op.register_fake
def _(logits: Tensor, out: Tensor) -> None:
    return None


def argmax(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """As :func:`hybridlm.kernels.greedy.reference.argmax`, in one kernel."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(logits.shape[0], device=logits.device, dtype=torch.int64)
    argmax_into_op(logits, out)
    return out


def unsupported_reason(device: torch.device, dtype: torch.dtype, vocab: int) -> str | None:
    """Why the kernel cannot take these inputs (plain values); None when it can."""
    return (device_type_reason(device, "the Triton greedy kernel") or dtypes_reason((dtype,), DTYPES)
            or (f"a vocabulary of {vocab} (at most 2**31 - 1)" if vocab >= 2 ** 31 - 1 else None))
