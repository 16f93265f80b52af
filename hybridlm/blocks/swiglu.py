"""SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.hidden = hidden
        self.w1 = nn.Linear(d_model, hidden, bias=False, **factory)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False, **factory)  # value
        self.w2 = nn.Linear(hidden, d_model, bias=False, **factory)  # down

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, cache=None) -> Tensor:
        # position-wise: packing and caches do not change it
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
