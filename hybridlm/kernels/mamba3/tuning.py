"""The Mamba-3 kernels' tuning knobs: one frozen object, read once, part of every compile key.

The defaults are what the kernels are tuned for (docs/benchmarks.md, "Kernel design notes"); the
knobs exist for benchmarks and experiments. :func:`kernel_tuning` reads the environment the first
time it is called and keeps the result; :func:`use_tuning` replaces it (for a benchmark sweep)
and :func:`tuning_from_env` parses an environment explicitly. Every value a knob sets reaches
the compiled kernel as part of its cache key: the Triton launches pass them as ``tl.constexpr``
or launch options (``num_warps``, ``num_stages``), which Triton's JIT keys on; the CuTe step's
resolved tiling is its compile cache's key (:func:`hybridlm.kernels.mamba3.cute.kernel_config`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator, Mapping


@dataclass(frozen=True)
class KernelTuning:
    """Tuning knobs of the Triton scan and the CuTe decode step (environment variable in brackets).

    triton_block_pairs      rotation pairs per block of the d_state axis in the chunk kernels
                            (a block spans twice as many state columns) [HYBRIDLM_TRITON_BLOCK_PAIRS]
    triton_warps            warps of the chunk-parallel forward and the backward chunk kernels;
                            None: the per-kernel choice of :class:`ScanSpec` [HYBRIDLM_TRITON_WARPS]
    triton_backward_stages  software-pipeline stages of the backward chunk kernels
                            [HYBRIDLM_TRITON_BACKWARD_STAGES]
    triton_backward_kernels the backward chunk pass's design: 1, one fused kernel; 2, split in
                            a dv kernel and a dq/dk kernel (triton/chunk_bwd.py)
                            [HYBRIDLM_TRITON_BACKWARD_KERNELS]
    triton_fuse_ranks       1: MIMO's rank expansion of x fused into the scan kernels (they load x per token
                            and weight it per rank as it loads; the backward chunk kernel reduces dv over
                            each token's ranks into dx and sums d mimo_x per chunk), so v (T, R, H, P) is
                            never written; 0: the expansion kernels (triton/ranks.py) [HYBRIDLM_TRITON_FUSE_RANKS]
    triton_bias_rows        token-rank rows one program of the B/C bias-gradient sums reduces; None:
                            about 1,024 programs in all (triton/head_sums.py ``bias_rows_for``)
                            [HYBRIDLM_TRITON_BIAS_ROWS]
    triton_group_heads      heads of a group one load of the dq/dk group sums takes, side by side in
                            memory; None: enough for 256 values a row (triton/head_sums.py); 1: head by head
                            [HYBRIDLM_TRITON_GROUP_HEADS]
    triton_bias_in_group_sums 1: with one rank (SISO), the group sums also write each row block's
                            per-head column sums, summed by torch into the bias gradients; 0 (default): the
                            bias kernel's second pass. Timed on the H200 (2026-12-05, B 8, L 2K): the group
                            sums with column sums 343 / 671 µs at d_state 64 / 128, against 73 + 70 / 139 + 131
                            µs for the group sums and the bias kernel (docs/benchmarks.md)
                            [HYBRIDLM_TRITON_BIAS_IN_GROUP_SUMS]
    triton_narrow_state_grads 1: the backward's state gradient leaving each chunk (G, n_chunks × H × P × N) is
                            stored in the matmul dtype (bf16/fp16), as the forward's states are; 0 (default):
                            fp32. Its uses are bf16 products but for one fp32 sum (⟨S_c, G⟩, d cs_end), so
                            this halves G's bytes (0.27 GB written and read a SISO layer at B 8, L 2K, d_state
                            64; 2.1 GB MIMO R = 4, d_state 128) at the cost of one rounding; not yet timed
                            [HYBRIDLM_TRITON_NARROW_STATE_GRADS]
    triton_states_block_pairs rotation pairs per block of the states kernel (triton/states.py);
                            None: triton_block_pairs [HYBRIDLM_TRITON_STATES_BLOCK_PAIRS]
    triton_states_split_p   programs that share one head's P rows in the states kernel (each owns
                            headdim / split of them: more programs in flight, the k rows read by each)
                            [HYBRIDLM_TRITON_STATES_SPLIT_P]
    triton_states_maxnreg   registers a thread of the states kernel may use (ptxas's cap, Triton's
                            ``maxnreg``); None: 128 for bf16/fp16, ptxas's choice for fp32
                            [HYBRIDLM_TRITON_STATES_MAXNREG]
    triton_states_stages    software-pipeline stages of the states kernel's chunk walk; None: 2 for
                            bf16/fp16, 1 for fp32 [HYBRIDLM_TRITON_STATES_STAGES]
    triton_output_block_t   tokens a program of the output-stage kernels (the gate and grouped norm
                            and the MIMO rank contraction, triton/output.py, and the MIMO rank
                            expansion, triton/ranks.py) takes; None: 32 (output) and 64 (expansion)
                            [HYBRIDLM_TRITON_OUTPUT_BLOCK_T]
    triton_output_warps     warps of those kernels; None: 4 [HYBRIDLM_TRITON_OUTPUT_WARPS]
    cute_max_rows           most state rows one thread of the CuTe step owns; None: 8 (MIMO too:
                            its step 8 % faster than at 4 on the H100) [HYBRIDLM_CUTE_MAX_ROWS]
    cute_min_blocks         CTAs per SM the CuTe step's register budget must allow; None: as
                            many as 128 registers a thread give [HYBRIDLM_CUTE_MIN_BLOCKS]
    cute_prerotate          1: the CuTe step rotates B and C once per CTA, as its warps normalize them;
                            0: each thread rotates its slots of them for every rank; None: 1 for MIMO
                            (rank > 1: its step kernel 1.3-3 % faster on the H100), 0 for SISO (no
                            gain) [HYBRIDLM_CUTE_PREROTATE]
    """

    triton_block_pairs: int = 16
    triton_warps: int | None = None
    triton_backward_stages: int = 1
    triton_backward_kernels: int = 1
    triton_fuse_ranks: int = 0
    triton_bias_rows: int | None = None
    triton_group_heads: int | None = None
    triton_bias_in_group_sums: int = 0
    triton_narrow_state_grads: int = 0
    triton_states_block_pairs: int | None = None
    triton_states_split_p: int = 1
    triton_states_maxnreg: int | None = None
    triton_states_stages: int | None = None
    triton_output_block_t: int | None = None
    triton_output_warps: int | None = None
    cute_max_rows: int | None = None
    cute_min_blocks: int | None = None
    cute_prerotate: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            allowed, text = CHOICES.get(f.name, (None, "a positive integer"))
            wrong_type = not isinstance(value, int) or isinstance(value, bool)
            if wrong_type or (value not in allowed if allowed else value < 1):
                raise ValueError(f"KernelTuning.{f.name} must be {text}; got {value!r}")
        for name in ("triton_block_pairs", "triton_group_heads", "triton_states_block_pairs", "triton_states_split_p",
                     "triton_output_block_t", "triton_output_warps"):
            value = getattr(self, name)
            if value is not None and value & (value - 1):
                raise ValueError(f"KernelTuning.{name} must be a power of two; got {value}")


# the knobs that pick one of a few designs: their values, and how an error names them
CHOICES: dict[str, tuple[tuple[int, ...], str]] = {
    "triton_backward_kernels": ((1, 2), "1 (fused) or 2 (split)"),
    "triton_fuse_ranks": ((0, 1), "0 (the expansion kernels) or 1 (fused into the scan kernels)"),
    "triton_bias_in_group_sums": ((0, 1), "0 (the bias kernel) or 1 (the group sums' partial column sums)"),
    "triton_narrow_state_grads": ((0, 1), "0 (G stored in fp32) or 1 (G stored in the matmul dtype)"),
    "cute_prerotate": ((0, 1), "0 (each thread rotates its slots) or 1 (B and C rotated once per CTA)"),
}

ENV_VARS: dict[str, str] = {
    "triton_block_pairs": "HYBRIDLM_TRITON_BLOCK_PAIRS",
    "triton_warps": "HYBRIDLM_TRITON_WARPS",
    "triton_backward_stages": "HYBRIDLM_TRITON_BACKWARD_STAGES",
    "triton_backward_kernels": "HYBRIDLM_TRITON_BACKWARD_KERNELS",
    "triton_fuse_ranks": "HYBRIDLM_TRITON_FUSE_RANKS",
    "triton_bias_rows": "HYBRIDLM_TRITON_BIAS_ROWS",
    "triton_group_heads": "HYBRIDLM_TRITON_GROUP_HEADS",
    "triton_bias_in_group_sums": "HYBRIDLM_TRITON_BIAS_IN_GROUP_SUMS",
    "triton_narrow_state_grads": "HYBRIDLM_TRITON_NARROW_STATE_GRADS",
    "triton_states_block_pairs": "HYBRIDLM_TRITON_STATES_BLOCK_PAIRS",
    "triton_states_split_p": "HYBRIDLM_TRITON_STATES_SPLIT_P",
    "triton_states_maxnreg": "HYBRIDLM_TRITON_STATES_MAXNREG",
    "triton_states_stages": "HYBRIDLM_TRITON_STATES_STAGES",
    "triton_output_block_t": "HYBRIDLM_TRITON_OUTPUT_BLOCK_T",
    "triton_output_warps": "HYBRIDLM_TRITON_OUTPUT_WARPS",
    "cute_max_rows": "HYBRIDLM_CUTE_MAX_ROWS",
    "cute_min_blocks": "HYBRIDLM_CUTE_MIN_BLOCKS",
    "cute_prerotate": "HYBRIDLM_CUTE_PREROTATE",
}


def tuning_from_env(environ: Mapping[str, str] | None = None) -> KernelTuning:
    """The defaults, with every knob whose environment variable is set taken from it."""
    environ = os.environ if environ is None else environ
    given = {}
    for name, var in ENV_VARS.items():
        if environ.get(var):
            try:
                given[name] = int(environ[var])
            except ValueError:
                raise ValueError(f"{var}={environ[var]!r} is not an integer") from None
    return KernelTuning(**given)


_current: KernelTuning | None = None


def kernel_tuning() -> KernelTuning:
    """The tuning in force: the environment's, read on the first call, unless replaced."""
    global _current
    if _current is None:
        _current = tuning_from_env()
    return _current


@contextlib.contextmanager
def use_tuning(tuning: KernelTuning | None = None, **changes) -> Iterator[KernelTuning]:
    """Run the block with ``tuning`` (default: the current one) with ``changes`` applied, e.g.
    ``with use_tuning(triton_warps=8): ...`` in a benchmark; the previous tuning comes back after."""
    global _current
    previous = kernel_tuning()
    _current = dataclasses.replace(tuning or previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
