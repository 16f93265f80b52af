"""SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.blocks.norms import RMSNorm
from hybridlm.blocks.projection import project
from hybridlm.kernels import decode_gemv
from hybridlm.kernels.swiglu_gate import silu_mul_


class SwiGLU(nn.Module):
    """``gate_backend``: the ``swiglu_gate`` kernel backend; ``gemv_backend``: the ``decode_gemv`` one,
    which takes decode-sized inputs whole, with the block boundary's norm in front
    (:meth:`normed_forward`) (None: the registry's ``auto`` for both)."""

    def __init__(self, d_model: int, hidden: int, device=None, dtype=None, gate_backend: str | None = None,
                 gemv_backend: str | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.hidden = hidden
        self.gate_backend = gate_backend
        self.gemv_backend = gemv_backend
        self.w1 = nn.Linear(d_model, hidden, bias=False, **factory)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False, **factory)  # value
        self.w2 = nn.Linear(hidden, d_model, bias=False, **factory)  # down

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, cache=None) -> Tensor:
        # position-wise: packing and caches do not change it. Without autograd the gate's buffer
        # takes silu(gate) * value in one op (one kernel on CUDA, no extra (tokens, hidden) tensor);
        # with autograd the plain ops (silu's input is kept for the backward). A decode step (a few
        # rows, no autograd) can take w1, w3 and the gate in one kernel where a backend has one.
        w1, w3 = self.w1.weight, self.w3.weight
        if not torch.is_grad_enabled() and self._takes_gemv("silu_mul_gemv", x, w1, w3):
            return project(self.w2, decode_gemv.silu_mul_gemv(x, w1, w3, backend=self.gemv_backend),
                           self.gemv_backend)
        return self.w2(silu_mul_(self.w1(x), self.w3(x), backend=self.gate_backend))

    def normed_forward(self, h: Tensor, residual: Tensor | None, norm: RMSNorm, cu_seqlens: Tensor | None = None,
                       *, cache=None) -> tuple[Tensor, Tensor] | None:
        """The block boundary in front of this block (``norm`` of h + residual) and w1, w3 and the gate
        as one op, for a decode-sized input without autograd: (output, stream). None where this input
        takes the separate norm (:meth:`hybridlm.blocks.residual.ResidualBlock.fused_forward`)."""
        w1, w3 = self.w1.weight, self.w3.weight
        if torch.is_grad_enabled() or not self._takes_gemv("norm_gemv", h, residual, norm.weight, w1, w3):
            return None
        hidden, stream = decode_gemv.norm_gemv(h, residual, norm.weight, norm.eps, w1, w3, backend=self.gemv_backend)
        return project(self.w2, hidden, self.gemv_backend), stream

    def _takes_gemv(self, op: str, x: Tensor, *tensors: Tensor | None) -> bool:
        return decode_gemv.backend_for(op, x, *tensors, backend=self.gemv_backend) != "reference"
