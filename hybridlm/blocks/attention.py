"""Causal grouped-query attention with RoPE or NoPE, QK-norm, sliding window and a KV cache.

The module knows nothing of parallelism: each call reads its head counts from the shapes of
``wq`` and ``wk``, so hybridlm/titan/tensor_parallel.py runs this same code on one rank's heads by
passing that rank's tensors (``torch.func.functional_call``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hybridlm.blocks.norms import RMSNorm
from hybridlm.blocks.projection import project
from hybridlm.errors import ShapeError
from hybridlm.kernels import decode_gemv
from hybridlm.kernels.attention import cached_attention, causal_attention
from hybridlm.kernels.kv_append import append_kv
from hybridlm.kernels.rope import rope_qk
from hybridlm.layouts.blocks import attention_problems


@dataclass
class KVCache:
    """Preallocated keys and values (B, max_len, n_kv_heads, head_dim) with per-row lengths.

    ``lengths`` (B,) int32 on the cache's device: the tokens row b holds. Decode steps update it in
    place, so a CUDA graph can replay them. ``max_filled`` is a host-side upper bound of every row's
    length, for capacity checks without a device sync; graph replays run no Python, so whoever
    replays them sets it (:meth:`set_host_length`).
    """

    k: Tensor
    v: Tensor
    lengths: Tensor
    max_filled: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def check_room(self, new_tokens: int) -> None:
        needed = self.max_filled + new_tokens
        if needed > self.max_len:
            raise ShapeError(f"KV cache holds {self.max_len} tokens; {needed} needed. Allocate a larger cache.")

    def set_host_length(self, n: int) -> None:
        self.max_filled = n

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows ``start:stop``, views of this cache's tensors; its host bound starts at 0 (empty rows)."""
        return KVCache(self.k[start:stop], self.v[start:stop], self.lengths[start:stop])

    def zero_(self) -> "KVCache":
        """Empty every row. Keys and values stay: nothing past a row's length is ever read."""
        self.lengths.zero_()
        self.max_filled = 0
        return self

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2 + self.lengths.numel() * self.lengths.element_size()


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 position: str = "rope", rope_theta: float = 10000.0, qk_norm: bool = False,
                 window: int | None = None, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        config = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, position=position)
        # the rules of the spec (hybridlm/layouts/blocks.py), so a layer built by hand obeys them too
        problems = [f"{field}={config[field]!r} {reason}" for field, reason in attention_problems(d_model, **config)]
        if problems:
            raise ValueError(f"Attention(d_model={d_model}): " + "; ".join(problems))
        self.d_model = d_model
        # the whole layer's head counts (a tensor-parallel rank computes fewer: see heads())
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.position = position
        self.rope_theta = rope_theta
        self.window = window
        self.layer_idx = layer_idx
        self.backend = backend  # None: HYBRIDLM_ATTENTION, then auto (kernels/registry.py)
        self.rope_backend: str | None = None  # kernels/rope/: auto is Triton on CUDA when autograd is off
        self.kv_backend: str | None = None  # kernels/kv_append/ (a dense cache write, RoPE included): the same
        self.gemv_backend: str | None = None  # kernels/decode_gemv/, for normed_forward (None: auto)
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

    def heads(self) -> tuple[int, int]:
        """(query heads, key/value heads) this module computes, read from ``wq``/``wk``: the whole
        layer, or one tensor-parallel rank's heads when it is called with that rank's tensors."""
        return self.wq.weight.shape[0] // self.head_dim, self.wk.weight.shape[0] // self.head_dim

    def _packed_positions(self, cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor]:
        """Packed tokens -> (their sequence index, their position within it), both (T,)."""
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(seqlens.numel(), device=cu_seqlens.device), seqlens,
                                      output_size=total)  # output_size: no host sync
        return seq, torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seq]

    def _rope(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q and k (..., heads, head_dim) by their tokens' positions (any leading shape of q)."""
        return rope_qk(q, k, positions, self.rope_theta, backend=self.rope_backend)

    def forward(self, x: Tensor, cu_seqlens: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(f"Attention expects (batch, seq, {self.d_model}); got {tuple(x.shape)}")
        return self._attend(self.wq(x), self.wk(x), self.wv(x), cu_seqlens, cache)

    def normed_forward(self, h: Tensor, residual: Tensor | None, norm: RMSNorm, cu_seqlens: Tensor | None = None,
                       *, cache: KVCache | None = None) -> tuple[Tensor, Tensor] | None:
        """A decode step with the block boundary in front of it (``norm`` of h + residual) and q, k and v
        as one op (:mod:`hybridlm.kernels.decode_gemv`): (output, stream). None where this input takes
        the separate norm (not a dense one-token step with a cache, autograd, or no kernel for it)."""
        if torch.is_grad_enabled() or cache is None or cu_seqlens is not None or h.dim() != 3 or h.shape[1] != 1:
            return None
        wq, wk, wv = self.wq.weight, self.wk.weight, self.wv.weight
        rows = (wq.shape[0], wk.shape[0])
        if decode_gemv.backend_for("norm_gemv", h, residual, norm.weight, wq, None, wk, wv, backend=self.gemv_backend,
                                   stacked_rows=rows) == "reference":
            return None
        qkv, stream = decode_gemv.norm_gemv(h, residual, norm.weight, norm.eps, wq, stacked=(wk, wv),
                                            backend=self.gemv_backend)
        q, k, v = qkv.split((*rows, wv.shape[0]), dim=-1)
        return self._attend(q, k, v, cu_seqlens, cache), stream

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, cache: KVCache | None) -> Tensor:
        """The layer after its projections: q (B, L, Hq·D), k and v (B, L, Hk·D) -> (B, L, d_model)."""
        B, L, _ = q.shape
        n_heads, n_kv_heads = self.heads()
        q = q.unflatten(-1, (n_heads, self.head_dim))
        k = k.unflatten(-1, (n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (n_kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        scale = 1.0 / math.sqrt(self.head_dim)
        if cache is not None:
            out = self._attend_with_cache(q, k, v, cu_seqlens, cache, scale)
        else:
            if self.position == "rope":
                positions = (torch.arange(L, device=q.device) if cu_seqlens is None
                             else self._packed_positions(cu_seqlens, B * L)[1].view(B, L))
                q, k = self._rope(q, k, positions)
            out = causal_attention(q, k, v, cu_seqlens=cu_seqlens, window=self.window, scale=scale,
                                   backend=self.backend)
        return project(self.wo, out.flatten(-2), self.gemv_backend)

    def _attend_with_cache(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, cache: KVCache,
                           scale: float) -> Tensor:
        """Write the new keys/values after each row's cached tokens, then attend over the row.

        Dense input (B, L) continues every row by L tokens; packed input (cu_seqlens) continues row i
        by sequence i. A dense single token (a decode step) takes the fixed-shape path: index ops,
        the device-side ``lengths`` and a mask over the whole cache, so a CUDA graph can capture it.
        """
        B, L = q.shape[:2]
        if cu_seqlens is not None and B != 1:
            raise ShapeError(f"packed input with a KV cache must be (1, total); got {B} rows")
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if rows != cache.batch_size:
            what = "sequences (cu_seqlens)" if cu_seqlens is not None else "rows"
            raise ShapeError(f"KV cache was allocated for batch {cache.batch_size}; got {rows} {what}")
        if cu_seqlens is None:  # row b, positions lengths[b] .. lengths[b] + L - 1: one op (kernels/kv_append/)
            new_tokens = L
            cache.check_room(new_tokens)
            q, k = append_kv(q, k, v, cache.k, cache.v, cache.lengths,
                             self.rope_theta if self.position == "rope" else None, backend=self.kv_backend)
            kv_lengths = cache.lengths  # advanced in place
        else:
            seqlens = cu_seqlens[1:] - cu_seqlens[:-1]
            new_tokens = int(seqlens.max())  # a prefill: this host sync is fine
            cache.check_room(new_tokens)
            seq, local = self._packed_positions(cu_seqlens, L)
            positions = cache.lengths.long()[seq] + local  # (T,)
            kv_lengths = cache.lengths + seqlens.to(cache.lengths.dtype)
            if self.position == "rope":
                q, k = self._rope(q, k, positions)
            cache.k[seq, positions] = k[0].to(cache.k.dtype)
            cache.v[seq, positions] = v[0].to(cache.v.dtype)
        fresh = cache.max_filled == 0  # every row empty: the new tokens are the whole context
        decode_step = cu_seqlens is None and L == 1
        if fresh and not decode_step:
            # the same call as without a cache (a prefill equals the full forward exactly)
            out = causal_attention(q, k, v, cu_seqlens=cu_seqlens, window=self.window, scale=scale,
                                   backend=self.backend)
        else:
            out = cached_attention(q, cache.k, cache.v, kv_lengths, cu_seqlens=cu_seqlens, window=self.window,
                                   scale=scale, backend=self.backend,
                                   key_len=None if decode_step else cache.max_filled + new_tokens)
        if kv_lengths is not cache.lengths:
            cache.lengths.copy_(kv_lengths)
        cache.max_filled += new_tokens
        return out

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> KVCache:
        device = device or self.wq.weight.device
        dtype = dtype or self.wq.weight.dtype
        shape = (batch_size, max_seqlen, self.heads()[1], self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(batch_size, device=device, dtype=torch.int32))

    def state_bytes(self, context: int, dtype: torch.dtype | None = None) -> int:
        """KV-cache bytes per sequence at ``context`` tokens (a sliding window caps what is needed)."""
        item = torch.empty((), dtype=dtype or self.wq.weight.dtype).element_size()
        kept = min(context, self.window) if self.window else context
        return 2 * kept * self.heads()[1] * self.head_dim * item

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of QKᵀ and AV (no causal discount, as torchtitan counts)."""
        ctx = min(seq_len, self.window) if self.window else seq_len
        return 2 * 2 * self.heads()[0] * self.head_dim * ctx
