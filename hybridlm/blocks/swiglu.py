"""SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from hybridlm.kernels import swiglu_up
from hybridlm.kernels.swiglu_gate import silu_mul_


class SwiGLU(nn.Module):
    """``gate_backend``: the ``swiglu_gate`` kernel backend; ``up_backend``: the ``swiglu_up`` one,
    which takes decode-sized inputs whole (None: the registry's ``auto`` for both)."""

    def __init__(self, d_model: int, hidden: int, device=None, dtype=None, gate_backend: str | None = None,
                 up_backend: str | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.hidden = hidden
        self.gate_backend = gate_backend
        self.up_backend = up_backend
        self.w1 = nn.Linear(d_model, hidden, bias=False, **factory)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False, **factory)  # value
        self.w2 = nn.Linear(hidden, d_model, bias=False, **factory)  # down

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, cache=None) -> Tensor:
        # position-wise: packing and caches do not change it. Without autograd the gate's buffer
        # takes silu(gate) * value in one op (one kernel on CUDA, no extra (tokens, hidden) tensor);
        # with autograd the plain ops (silu's input is kept for the backward). A decode step (a few
        # rows, no autograd) can take w1, w3 and the gate in one kernel where a backend has one.
        w1, w3 = self.w1.weight, self.w3.weight
        if not torch.is_grad_enabled() and swiglu_up.backend_for(x, w1, w3, self.up_backend) != "reference":
            return self.w2(swiglu_up.silu_mul_gemv(x, w1, w3, backend=self.up_backend))
        return self.w2(silu_mul_(self.w1(x), self.w3(x), backend=self.gate_backend))
