"""Causal grouped-query attention with RoPE or NoPE, QK-norm, sliding window and a KV cache."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybridlm.blocks.norms import RMSNorm
from hybridlm.errors import ShapeError
from hybridlm.kernels.attention import causal_attention
from hybridlm.kernels.reference import rotate_pairs, upcast


@dataclass
class KVCache:
    """Preallocated keys and values (B, max_len, n_kv_heads, head_dim); ``length`` tokens are filled."""

    k: Tensor
    v: Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ShapeError(f"KV cache holds {self.max_len} tokens; {end} needed. Allocate a larger cache.")
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]

    def zero_(self) -> "KVCache":
        self.length = 0
        return self

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """(L,) positions -> (L, head_dim/2) angles, frequencies theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    return positions.to(torch.float64)[:, None] * inv_freq[None, :]


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 position: str = "rope", rope_theta: float = 10000.0, qk_norm: bool = False,
                 window: int | None = None, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({n_heads})")
        if position not in ("rope", "nope"):
            raise ValueError(f"position must be 'rope' or 'nope', got {position!r}")
        self.position = position
        self.rope_theta = rope_theta
        self.window = window
        self.layer_idx = layer_idx
        self.backend = backend  # None: HYBRIDLM_ATTENTION, then auto (kernels/attention.py)
        factory = {"device": device, "dtype": dtype}
        hd = self.head_dim
        self.wq = nn.Linear(d_model, n_heads * hd, bias=False, **factory)
        self.wk = nn.Linear(d_model, self.n_kv_heads * hd, bias=False, **factory)
        self.wv = nn.Linear(d_model, self.n_kv_heads * hd, bias=False, **factory)
        self.wo = nn.Linear(n_heads * hd, d_model, bias=False, **factory)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(hd, eps=norm_eps, **factory)
            self.k_norm = RMSNorm(hd, eps=norm_eps, **factory)

    def _positions(self, L: int, cu_seqlens: Tensor | None, offset: int, device) -> Tensor:
        if cu_seqlens is None:
            return torch.arange(offset, offset + L, device=device)
        starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1])
        return torch.arange(L, device=device) - starts

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(f"Attention expects (batch, seq, {self.d_model}); got {tuple(x.shape)}")
        if cache is not None and cu_seqlens is not None:
            raise ShapeError("a KV cache with packed sequences (cu_seqlens) is not supported; "
                             "decode sequences as a batch instead")
        B, L, _ = x.shape
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.length if cache is not None else 0
        if self.position == "rope":
            ang = rope_angles(self._positions(L, cu_seqlens, offset, x.device), self.head_dim, self.rope_theta)
            ang = ang[:, None, :]  # broadcast over heads
            q = rotate_pairs(upcast(q), ang.to(upcast(q).dtype), "half").to(q.dtype)
            k = rotate_pairs(upcast(k), ang.to(upcast(k).dtype), "half").to(k.dtype)
        if cache is not None:
            k, v = cache.append(k, v)
        out = causal_attention(q, k, v, cu_seqlens=cu_seqlens, q_offset=offset, window=self.window,
                               scale=1.0 / math.sqrt(self.head_dim), backend=self.backend)
        return self.wo(out.flatten(-2))

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> KVCache:
        device = device or self.wq.weight.device
        dtype = dtype or self.wq.weight.dtype
        shape = (batch_size, max_seqlen, self.n_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def state_bytes(self, context: int, dtype: torch.dtype | None = None) -> int:
        """KV-cache bytes per sequence at ``context`` tokens (a sliding window caps what is needed)."""
        item = torch.empty((), dtype=dtype or self.wq.weight.dtype).element_size()
        kept = min(context, self.window) if self.window else context
        return 2 * kept * self.n_kv_heads * self.head_dim * item

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of QKᵀ and AV (no causal discount, as torchtitan counts)."""
        ctx = min(seq_len, self.window) if self.window else seq_len
        return 2 * 2 * self.n_heads * self.head_dim * ctx
