"""How the CuTe step splits a head's state over threads: the rules the kernel and the host share
(:func:`hybridlm.kernels.mamba3.cute.kernel_config` applies them, with the tuning knobs)."""
from __future__ import annotations

VEC = 8  # state values per thread per row: two 16-byte pieces


# Most state rows a thread owns, whatever the rank (MIMO too: the k and k_prev slots and per-rank scalars are read
# once for 8 rows, and 4 CTAs fit a SM; its step 0.231 -> 0.212 ms at d_state 128, batch 128, against 4 rows: H100,
# 2026-12-05, docs/benchmarks.md session 28).
DEFAULT_MAX_ROWS = 8


def row_groups(headdim: int, d_state: int, max_rows: int | None = None) -> int | None:
    """Rows of the state worked on side by side: a divisor of headdim that gives whole warps, at
    most ``max_rows`` rows per thread (default DEFAULT_MAX_ROWS), and at least 128
    threads where it can. None: no such split."""
    max_rows = DEFAULT_MAX_ROWS if max_rows is None else max_rows
    lanes = d_state // VEC
    fits = [ng for ng in range(1, headdim + 1)
            if headdim % ng == 0 and (ng * lanes) % 32 == 0 and headdim // ng <= max_rows and ng * lanes <= 1024]
    if not fits:
        return None
    wide = [ng for ng in fits if ng * lanes >= 128]
    return min(wide) if wide else max(fits)


def default_min_blocks(threads: int) -> int:
    """CTAs per SM the registers must allow: with at most 128 registers a thread the CTAs keep
    enough of the state stream in flight (MIMO would take ~165 otherwise)."""
    return max(1, 65536 // (threads * 128))
