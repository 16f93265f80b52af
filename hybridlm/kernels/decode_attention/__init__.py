"""A decode step's attention over the KV cache (dense, one query a row), the op ``decode`` of the
``attention`` kind.

    out = decode_attention(q, cache.k, cache.v, cache.lengths, window=None, scale=None)

:func:`hybridlm.kernels.attention.cached_attention` sends a decode step here. ``reference.py``: the
math in plain PyTorch (tests hold the kernel to it); ``triton.py``: one Triton kernel with split-KV,
registered as the attention backend ``triton`` (it has only this op: prefill and training go to its
fallback, FA4, then SDPA). FA4 and SDPA take the op too (their cached forms).
"""
from __future__ import annotations

from hybridlm.kernels.decode_attention import reference

__all__ = ["reference"]
