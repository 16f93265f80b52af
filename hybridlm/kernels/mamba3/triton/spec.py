"""The shape and tiling of one scan call, shared by the forward and backward launches."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridlm.kernels.mamba3.triton.layout import ChunkLayout


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

    @property
    def block_pairs(self) -> int:
        """Rotation pairs per block of the d_state axis (a block spans twice as many dims). 16 keeps
        the chunk kernels nearly free of register spills on Hopper (benchmarks/kernel_report.py)."""
        return int(os.environ.get("HYBRIDLM_TRITON_BLOCK_PAIRS", 16))

    @property
    def block_p(self) -> int:
        return max(16, triton.next_power_of_2(self.headdim))

    @property
    def parallel_warps(self) -> int:
        """Warps of the chunk-parallel forward kernels: 8 once a chunk's tiles are 64 wide."""
        if "HYBRIDLM_TRITON_WARPS" in os.environ:  # a tuning knob for experiments
            return int(os.environ["HYBRIDLM_TRITON_WARPS"])
        return 8 if self.rank * self.layout.chunk >= 64 and self.block_p >= 64 else 4

    @property
    def backward_warps(self) -> int:
        """Warps of the fused backward chunk kernel. Measured on an H100 (B 8, L 2048, d_model 2048,
        P 64, bf16, 3 stages): 4 warps take 3.0 / 4.2 / 15.9 ms at d_state 64 / 128 / 128 with R 4,
        8 warps 2.8 / 4.3 / 20.9 ms (both at 255 registers and spilling). With fp32 products on 4
        warps ptxas keeps almost everything on the stack (40 KB of spill code), so they get 8: fp32
        inputs at d_state 128 take 18.9 ms on 8 warps, 120 ms on 4 (the three older kernels 49.5 ms).
        Rechecked at 1 stage on the final kernel (whole layer forward+backward, L 2048, d_state
        64 / 128): 2 warps 11.55 / 14.84 ms, 4 warps 9.02 / 11.85, 8 warps 10.47 / 14.00."""
        if "HYBRIDLM_TRITON_WARPS" in os.environ:
            return int(os.environ["HYBRIDLM_TRITON_WARPS"])
        return 8 if self.matmul_dtype == torch.float32 else 4

    @property
    def backward_stages(self) -> int:
        """Software-pipeline stages of the backward chunk kernel's pair-block loops. It is
        latency-bound at 255 registers, and prefetching the next block only adds live values:
        on the H100 above (4 warps) 1 / 2 / 3 stages take 2.0 / 2.3 / 2.8 ms at d_state 64,
        3.2 / 3.4 / 4.4 ms at 128 and 12.9 / 15.2 / 16.5 ms at 128 with R 4."""
        return int(os.environ.get("HYBRIDLM_TRITON_BACKWARD_STAGES", 1))

    def dims(self) -> tuple[int, ...]:
        """The runtime sizes every chunk kernel takes, in its argument order."""
        return (self.n_heads, self.n_heads // self.n_groups, self.n_groups, self.d_state, self.d_state // 2,
                self.headdim, self.n_angles)

    def constexprs(self) -> dict:
        # Triton 3.6's interpreter multiplies bf16/fp16 operands wrongly (numpy has no bf16), so on
        # the CPU the products run in fp32; the compiled kernels use the tensor cores' dtype.
        fp32 = self.matmul_dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
        half = tl.bfloat16 if self.matmul_dtype == torch.bfloat16 else tl.float16
        return dict(R=self.rank, CHUNK=self.layout.chunk, BLOCK_PAIRS=self.block_pairs, INTERLEAVED=self.interleaved,
                    MM_DTYPE=tl.float32 if fp32 else half, PRECISION="ieee" if fp32 else "tf32")
