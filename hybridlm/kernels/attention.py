"""Causal attention on tensors: q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D).

``q_offset`` is the absolute position of q's first token among the keys (decode / chunked
prefill from a KV cache); ``window`` keeps a key j for query i only when i - j < window.
Packed input is B = 1 with ``cu_seqlens``.

Backends: ``fa4`` (FlashAttention-4 on Hopper and newer, bf16/fp16) and ``sdpa`` (PyTorch's
scaled_dot_product_attention: every device and dtype). The choice, in order: the ``backend``
argument (the attention spec's field), the ``HYBRIDLM_ATTENTION`` environment variable, then
``auto``: FA4 where it imports and takes the inputs, SDPA otherwise. A forced ``fa4`` that cannot
run raises one error naming why; ``auto`` on a GPU where FA4 is installed but refuses the inputs
warns once with the reason and runs SDPA.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.errors import BackendUnavailable
from hybridlm.kernels import fa4

ENV_VAR = "HYBRIDLM_ATTENTION"
BACKENDS = ("auto", "fa4", "sdpa")
_warned: set[str] = set()


def _mask(lq: int, lk: int, q_offset: int, window: int | None, device) -> Tensor | None:
    if window is None and q_offset == 0 and lq == lk:
        return None  # plain causal: let SDPA use is_causal
    qpos = torch.arange(lq, device=device)[:, None] + q_offset
    kpos = torch.arange(lk, device=device)[None, :]
    keep = kpos <= qpos
    if window is not None:
        keep &= (qpos - kpos) < window
    return keep


def _dense_sdpa(q: Tensor, k: Tensor, v: Tensor, q_offset: int, window: int | None, scale: float | None) -> Tensor:
    lq, lk = q.shape[1], k.shape[1]
    mask = _mask(lq, lk, q_offset, window, q.device)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
                   window: int | None = None, scale: float | None = None) -> Tensor:
    """SDPA; packed input is attended one sequence at a time."""
    if cu_seqlens is None:
        return _dense_sdpa(q, k, v, q_offset, window, scale)
    bounds = cu_seqlens.tolist()
    outs = [_dense_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], 0, window, scale) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1)


def resolve_attention_backend(requested: str | None, q: Tensor, k: Tensor, q_offset: int = 0) -> str:
    """``fa4`` or ``sdpa`` for these inputs (see the module docstring for the order of choice)."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "argument" if requested else ENV_VAR
        raise BackendUnavailable(f"unknown attention backend {name!r} (from {source}); choose one of: "
                                 f"{', '.join(BACKENDS)}")
    if name == "sdpa":
        return "sdpa"
    reason = fa4.unsupported_reason(q, k, q_offset)
    if reason is None:
        return "fa4"
    if name == "fa4":
        raise BackendUnavailable(f"attention backend 'fa4' cannot run: {reason}. Use backend 'sdpa' or 'auto'.")
    if q.device.type == "cuda" and fa4.import_error() is None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attention: FA4 cannot take these inputs ({reason}); using SDPA", stacklevel=3)
    return "sdpa"


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
                     window: int | None = None, scale: float | None = None, backend: str | None = None) -> Tensor:
    if resolve_attention_backend(backend, q, k, q_offset) == "fa4":
        return fa4.fa4_attention(q, k, v, cu_seqlens=cu_seqlens, window=window, scale=scale)
    return sdpa_attention(q, k, v, cu_seqlens=cu_seqlens, q_offset=q_offset, window=window, scale=scale)
