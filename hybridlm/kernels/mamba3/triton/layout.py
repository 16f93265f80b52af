"""How the Triton kernels see a batch: packed tokens cut into chunks.

Every input is flattened to one token axis of length T = Σ lengths (a dense (B, L) batch is B
sequences of length L, so dense and packed inputs share one code path). Chunks never cross a
sequence boundary; chunk ``c`` of sequence ``s`` has the global index ``cu_chunks[s] + c``, which
addresses the per-chunk state buffers.

A dense layout is built from host integers. A packed layout is built on the device from
``cu_seqlens`` with shapes that depend only on T and the number of sequences, never on their
lengths: no host sync, and nothing for ``torch.compile`` to specialise on. Its chunk slots are an
upper bound, T // chunk + NS ≥ Σ ⌈n_s / chunk⌉; the slots past the real chunks are empty (they
start at T), and the chunk kernels return at once for them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ChunkLayout:
    chunk: int  # tokens per chunk
    n_seqs: int
    n_chunks: int
    cu_seqlens: Tensor  # (NS + 1,) int32, token offsets
    cu_chunks: Tensor  # (NS + 1,) int32, chunk offsets
    chunk_seq: Tensor  # (n_chunks,) int32, the sequence of each chunk
    chunk_start: Tensor  # (n_chunks,) int32, the first token of each chunk
    last_token: Tensor  # (NS,) int64, last token of each sequence (clamped to 0 for empty ones)
    empty: Tensor  # (NS,) bool, sequences of length 0
    nonempty_last_token: Tensor  # last tokens of the sequences that have one; T for an empty one (packed layouts)
    has_empty: bool  # True when some sequence may be empty (always for packed layouts: lengths stay on the device)

    @property
    def first_token(self) -> Tensor:
        return self.cu_seqlens[:-1].long()


def kernel_chunk(chunk_size: int, rank: int) -> int:
    """Tokens per chunk: the caller's chunk size rounded down to a power of two, capped so that a
    chunk has at most 64 token-rank rows (64/R tokens, as the paper tiles MIMO) and at least 16
    (the smallest matrix tile)."""
    chunk = 1 << (max(1, chunk_size).bit_length() - 1)
    chunk = min(chunk, max(1, 64 // rank))
    return max(chunk, -(-16 // rank))


def build_layout(lengths: list[int], chunk: int, device: torch.device) -> ChunkLayout:
    n_chunks_per_seq = [-(-n // chunk) for n in lengths]
    cu_seqlens, cu_chunks, chunk_seq, chunk_start = [0], [0], [], []
    for s, (n, nc) in enumerate(zip(lengths, n_chunks_per_seq)):
        chunk_seq += [s] * nc
        chunk_start += [cu_seqlens[-1] + i * chunk for i in range(nc)]
        cu_seqlens.append(cu_seqlens[-1] + n)
        cu_chunks.append(cu_chunks[-1] + nc)

    def tensor(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=device)

    # Everything from the Python lengths, no tensor reductions: no host sync, and nothing
    # data-dependent for torch.compile to break the graph on.
    ends = cu_seqlens[1:]
    return ChunkLayout(
        chunk=chunk, n_seqs=len(lengths), n_chunks=cu_chunks[-1],
        cu_seqlens=tensor(cu_seqlens), cu_chunks=tensor(cu_chunks), chunk_seq=tensor(chunk_seq),
        chunk_start=tensor(chunk_start), last_token=tensor([max(e - 1, 0) for e in ends], torch.long),
        empty=tensor([n == 0 for n in lengths], torch.bool),
        nonempty_last_token=tensor([e - 1 for e, n in zip(ends, lengths) if n], torch.long),
        has_empty=0 in lengths)


def dense_layout(batch: int, seqlen: int, chunk: int, device: torch.device) -> ChunkLayout:
    """Cached in eager (a training loop builds the same layout every step). Under torch.compile
    the layout's tensors are built inside the graph instead: dynamo does not honour the cache."""
    if torch.compiler.is_compiling():
        return build_layout([seqlen] * batch, chunk, device)
    return _cached_dense_layout(batch, seqlen, chunk, device)


@functools.lru_cache(maxsize=64)
def _cached_dense_layout(batch: int, seqlen: int, chunk: int, device: torch.device) -> ChunkLayout:
    return build_layout([seqlen] * batch, chunk, device)


def packed_layout(cu_seqlens: Tensor, chunk: int, total: int | None = None) -> ChunkLayout:
    """The layout of packed sequences, computed on the device (no host sync); ``total`` is T when
    the caller knows it (the packed axis' length), else ``cu_seqlens[-1]`` is read on the host."""
    cu = cu_seqlens.to(torch.int32)
    n_seqs = cu.shape[0] - 1
    if total is None:
        total = int(cu[-1])
    lengths = cu[1:] - cu[:-1]
    chunk_ends = torch.cumsum(torch.div(lengths + (chunk - 1), chunk, rounding_mode="floor"), 0, dtype=torch.int32)
    cu_chunks = F.pad(chunk_ends, (1, 0))
    slots = torch.arange(total // chunk + n_seqs, device=cu.device, dtype=torch.int32)
    # searchsorted over the cumsum itself: Inductor (torch 2.11) cannot lower it over a slice of the pad
    seq = torch.searchsorted(chunk_ends, slots, right=True).to(torch.int32).clamp_(max=n_seqs - 1)
    start = cu[seq] + (slots - cu_chunks[seq]) * chunk
    nonempty = lengths > 0
    return ChunkLayout(
        chunk=chunk, n_seqs=n_seqs, n_chunks=slots.shape[0], cu_seqlens=cu, cu_chunks=cu_chunks, chunk_seq=seq,
        chunk_start=torch.where(slots < cu_chunks[-1], start, total).to(torch.int32),
        last_token=(cu[1:] - 1).clamp(min=0).long(), empty=~nonempty,
        # as a fixed-shape index: an empty sequence points past the end (callers index a T + 1 buffer)
        nonempty_last_token=torch.where(nonempty, cu[1:] - 1, total).long(), has_empty=True)
