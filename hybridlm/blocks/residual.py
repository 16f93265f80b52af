"""The pre-norm residual block: h + mixer(norm(h))."""
from __future__ import annotations

from torch import Tensor, nn

from hybridlm.blocks.norms import RMSNorm


class ResidualBlock(nn.Module):
    """Wraps any mixer with ``forward(x, cu_seqlens=None, cache=None)``.

    With ``residual_in_fp32`` the stream ``h`` stays fp32 while the mixer runs in its own dtype.
    """

    def __init__(self, mixer: nn.Module, d_model: int, norm_eps: float = 1e-5, residual_in_fp32: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None, cache=None) -> Tensor:
        x = self.norm(h).to(self.norm.weight.dtype)
        out = self.mixer(x, cu_seqlens=cu_seqlens, cache=cache)
        return h + out.to(h.dtype)

    def fused_forward(self, h: Tensor, residual: Tensor | None, cu_seqlens: Tensor | None = None,
                      cache=None) -> tuple[Tensor, Tensor]:
        """The inference form, one fused op per block boundary: add the previous block's output
        ``residual`` (None for the first block) to the stream ``h`` and norm it in one op, then run
        the mixer. Returns (this block's output, the stream); the next block's norm adds the output.
        With the reference kernel, the same roundings as :meth:`forward` (bitwise). A mixer with
        ``normed_forward`` may take the norm into its first projection (one kernel at decode sizes)."""
        normed_forward = getattr(self.mixer, "normed_forward", None)
        if normed_forward is not None:
            fused = normed_forward(h, residual, self.norm, cu_seqlens, cache=cache)
            if fused is not None:
                return fused
        x, h = self.norm.add_forward(h, residual, self.norm.weight.dtype)
        return self.mixer(x, cu_seqlens=cu_seqlens, cache=cache), h

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None):
        alloc = getattr(self.mixer, "allocate_cache", None)
        return None if alloc is None else alloc(batch_size, max_seqlen, device=device, dtype=dtype)
