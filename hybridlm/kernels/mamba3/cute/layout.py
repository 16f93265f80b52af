"""How the CuTe step splits a head's state over threads (no imports: the kernel and the host use it)."""
from __future__ import annotations

import os

VEC = 8  # state values per thread per row: two 16-byte pieces


def row_groups(headdim: int, d_state: int, rank: int = 1) -> int | None:
    """Rows of the state worked on side by side: a divisor of headdim that gives whole warps, at
    most 8 rows per thread (4 for MIMO, whose rows cost R times more; measured on an H100:
    0.304 vs 0.317 ms at batch 128, d_state 128; HYBRIDLM_CUTE_MAX_ROWS overrides), and at least
    128 threads where it can. None: no such split."""
    max_rows = int(os.environ.get("HYBRIDLM_CUTE_MAX_ROWS", 8 if rank == 1 else 4))
    lanes = d_state // VEC
    fits = [ng for ng in range(1, headdim + 1)
            if headdim % ng == 0 and (ng * lanes) % 32 == 0 and headdim // ng <= max_rows and ng * lanes <= 1024]
    if not fits:
        return None
    wide = [ng for ng in fits if ng * lanes >= 128]
    return min(wide) if wide else max(fits)
