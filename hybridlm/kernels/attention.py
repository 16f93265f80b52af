"""Causal attention on tensors (SDPA). q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D).

``q_offset`` is the absolute position of q's first token among the keys (decode / chunked
prefill from a KV cache); ``window`` keeps a key j for query i only when i - j < window.
Packed input (B = 1 with ``cu_seqlens``) is attended one sequence at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _mask(lq: int, lk: int, q_offset: int, window: int | None, device) -> Tensor | None:
    if window is None and q_offset == 0 and lq == lk:
        return None  # plain causal: let SDPA use is_causal
    qpos = torch.arange(lq, device=device)[:, None] + q_offset
    kpos = torch.arange(lk, device=device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep &= (qpos - kpos) < window
    return keep


def _dense(q: Tensor, k: Tensor, v: Tensor, q_offset: int, window: int | None, scale: float | None) -> Tensor:
    lq, lk = q.shape[1], k.shape[1]
    mask = _mask(lq, lk, q_offset, window, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
                     window: int | None = None, scale: float | None = None) -> Tensor:
    if cu_seqlens is None:
        return _dense(q, k, v, q_offset, window, scale)
    bounds = cu_seqlens.tolist()
    outs = [_dense(q[:, s:e], k[:, s:e], v[:, s:e], 0, window, scale) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1)
