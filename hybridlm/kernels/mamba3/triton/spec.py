"""The shape and tiling of one scan call, shared by the forward and backward launches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridlm.kernels.mamba3.triton.interpreter_compat import interpreting
from hybridlm.kernels.mamba3.triton.layout import ChunkLayout
from hybridlm.kernels.mamba3.tuning import KernelTuning, kernel_tuning


@dataclass(frozen=True)
class ScanSpec:
    layout: ChunkLayout
    rank: int  # R
    n_groups: int  # G
    n_heads: int  # H
    d_state: int  # N
    headdim: int  # P
    n_angles: int  # S
    interleaved: bool
    matmul_dtype: torch.dtype  # operand dtype of the tensor-core products (fp32 inputs: fp32 "ieee")

    # the knobs (None: those in force at launch, so the traced glue that builds a spec never reads
    # them); their values reach the launches as constexprs or launch options, which Triton
    # compiles, and caches, per value
    tuning: KernelTuning | None = None

    @property
    def knobs(self) -> KernelTuning:
        return self.tuning or kernel_tuning()

    @property
    def block_pairs(self) -> int:
        """Rotation pairs per block of the d_state axis (a block spans twice as many dims); the
        default keeps the chunk kernels nearly free of register spills on Hopper
        (benchmarks/kernel_report.py)."""
        return self.knobs.triton_block_pairs

    @property
    def block_p(self) -> int:
        return max(16, triton.next_power_of_2(self.headdim))

    @property
    def parallel_warps(self) -> int:
        """Warps of the chunk-parallel forward kernels: 8 once a chunk's tiles are 64 wide."""
        if self.knobs.triton_warps is not None:
            return self.knobs.triton_warps
        return 8 if self.rank * self.layout.chunk >= 64 and self.block_p >= 64 else 4

    @property
    def backward_warps(self) -> int:
        """Warps of the backward chunk kernel(s): 4, or 8 for fp32 products (on 4 warps ptxas
        keeps most of their tiles on the stack)."""
        if self.knobs.triton_warps is not None:
            return self.knobs.triton_warps
        return 8 if self.matmul_dtype == torch.float32 else 4

    @property
    def backward_stages(self) -> int:
        """Software-pipeline stages of the backward chunk kernels' pair-block loops. The fused
        kernel is latency-bound at 255 registers, and prefetching the next block only adds live
        values."""
        return self.knobs.triton_backward_stages

    @property
    def backward_kernels(self) -> int:
        """The backward chunk pass's design: 1, the fused kernel; 2, the split pair (chunk_bwd.py).
        Both take backward_warps and backward_stages."""
        return self.knobs.triton_backward_kernels

    def dims(self) -> tuple[int, ...]:
        """The runtime sizes every chunk kernel takes, in its argument order."""
        return (self.n_heads, self.n_heads // self.n_groups, self.n_groups, self.d_state, self.d_state // 2,
                self.headdim, self.n_angles)

    def constexprs(self) -> dict:
        # Triton 3.6's interpreter multiplies bf16/fp16 operands wrongly (numpy has no bf16), so on
        # the CPU the products run in fp32; the compiled kernels use the tensor cores' dtype.
        fp32 = self.matmul_dtype == torch.float32 or interpreting()
        half = tl.bfloat16 if self.matmul_dtype == torch.bfloat16 else tl.float16
        return dict(R=self.rank, CHUNK=self.layout.chunk, BLOCK_PAIRS=self.block_pairs, INTERLEAVED=self.interleaved,
                    MM_DTYPE=tl.float32 if fp32 else half, PRECISION="ieee" if fp32 else "tf32")
