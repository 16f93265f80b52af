"""Causal attention on tensors: q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D).

``q_offset`` is the absolute position of q's first token among the keys (decode / chunked
prefill from a KV cache); ``window`` keeps a key j for query i only when i - j < window.
Packed input is B = 1 with ``cu_seqlens``.

:func:`cached_attention` reads keys from a preallocated KV cache (B, max_len, Hkv, D) whose rows hold
different numbers of tokens (``kv_lengths``); the queries are the last tokens of each row. Its
decode form (dense queries) has fixed shapes and no host sync, so it can run inside a CUDA graph.

Backends: ``fa4`` (FlashAttention-4 on Hopper and newer, bf16/fp16) and ``sdpa`` (PyTorch's
scaled_dot_product_attention: every device and dtype). The choice, in order: the ``backend``
argument (the attention spec's field), the ``HYBRIDLM_ATTENTION`` environment variable, then
``auto``: FA4 where it imports and takes the inputs, SDPA otherwise. A forced ``fa4`` that cannot
run raises one error naming why; ``auto`` on a GPU where FA4 is installed but cannot import or
refuses the inputs warns once with the reason and runs SDPA. The choice (:func:`choose_backend`)
is made from plain values, once per trace under ``torch.compile``, never inside the graph.
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


def _mask(lq: int, lk: int, q_offset: int, window: int | None, device, always: bool = False) -> Tensor | None:
    if window is None and q_offset == 0 and lq == lk and not always:
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
    """SDPA. Packed input (B = 1) is attended one sequence at a time (a host sync for the bounds);
    documents packed into rows (B > 1, ``cu_seqlens`` over the flattened rows) take one masked call."""
    if cu_seqlens is None:
        return _dense_sdpa(q, k, v, q_offset, window, scale)
    if q.shape[0] > 1:
        return _document_masked_sdpa(q, k, v, cu_seqlens, window, scale)
    bounds = cu_seqlens.tolist()
    outs = [_dense_sdpa(q[:, s:e], k[:, s:e], v[:, s:e], 0, window, scale) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1)


def document_ids(cu_seqlens: Tensor, shape: tuple[int, int]) -> Tensor:
    """(B, L) index of the document each token of B rows of L belongs to (``cu_seqlens`` over the
    flattened rows). Device ops of fixed shape: no host sync."""
    positions = torch.arange(shape[0] * shape[1], device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, positions, right=True).view(shape)


def _document_masked_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int | None,
                          scale: float | None) -> Tensor:
    """Rows of packed documents (documents never cross rows): causal within each document."""
    B, L = q.shape[:2]
    doc = document_ids(cu_seqlens, (B, L))
    keep = (doc[:, :, None] == doc[:, None, :]) & _mask(L, L, 0, window, q.device, always=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep[:, None], scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _requested_backend(requested: str | None) -> str:
    """The argument, else the environment variable, else ``auto``; an unknown name raises."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "argument" if requested else ENV_VAR
        raise BackendUnavailable(f"unknown attention backend {name!r} (from {source}); choose one of: "
                                 f"{', '.join(BACKENDS)}")
    return name


@torch.compiler.assume_constant_result  # dynamo runs it at trace time and keeps the answer
def choose_backend(requested: str | None, device_type: str, device_index: int | None, dtype: torch.dtype,
                   k_dtype: torch.dtype, head_dim: int, aligned: bool = True, cached: bool = False) -> str:
    """``fa4`` or ``sdpa`` for inputs of this kind (see the module docstring for the order of choice).

    Takes plain values, not tensors, so that ``torch.compile`` calls it once while tracing instead
    of tracing into it: the optional import of FA4, warnings and errors all happen there, outside
    the graph. (The environment variable is read then, too: set it before the first compiled call.)
    """
    name = _requested_backend(requested)
    if name == "sdpa":
        return "sdpa"
    reason = fa4.unsupported_reason_for(torch.device(device_type, device_index), dtype, k_dtype, head_dim, aligned)
    if reason is None:
        return "fa4"
    if name == "fa4":
        raise BackendUnavailable(f"attention backend 'fa4' cannot run: {reason}. Use backend 'sdpa' or 'auto'.")
    if not cached and fa4.device_reason(torch.device(device_type, device_index), "FA4") is None:
        _warn_fallback(reason)  # a device FA4 could run on: say why it does not
    return "sdpa"


def _warn_fallback(reason: str) -> None:
    """Once per reason, on a GPU: FA4 is installed but cannot run, or refuses these inputs."""
    if fa4.import_error() is not None:
        if not fa4.installed():
            return  # FA4 is simply not there: SDPA is the expected path, nothing to say
        reason = f"FA4 is installed but unusable: {reason}"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attention: FA4 cannot run ({reason}); using SDPA", stacklevel=4)


def resolve_attention_backend(requested: str | None, q: Tensor, k: Tensor, q_offset: int = 0) -> str:
    """``fa4`` or ``sdpa`` for these inputs."""
    aligned = not q_offset or k.shape[1] == q_offset + q.shape[1]
    return choose_backend(requested, q.device.type, q.device.index, q.dtype, k.dtype, int(q.shape[-1]), aligned)


def resolve_cached_backend(requested: str | None, q: Tensor, k_cache: Tensor) -> str:
    """``fa4`` or ``sdpa`` for reading a KV cache with per-row lengths.

    ``auto`` takes FA4's KV-cache entry (``seqused_k``) where FA4 takes the inputs: on an H100 it
    matched SDPA and replayed bitwise from a CUDA graph (tests/gpu/test_decode_gpu.py).
    """
    return choose_backend(requested, q.device.type, q.device.index, q.dtype, k_cache.dtype, int(q.shape[-1]),
                          True, True)


def _sdpa_cached_dense(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, window: int | None,
                       scale: float | None, key_len: int) -> Tensor:
    """Every row's L queries end at its ``kv_lengths``; one masked SDPA call over ``key_len`` keys.

    Shapes depend on L and ``key_len`` only, and the mask is built on the device: no host sync."""
    L = q.shape[1]
    qpos = (kv_lengths.long() - L)[:, None] + torch.arange(L, device=q.device)  # (B, L)
    kpos = torch.arange(key_len, device=q.device)
    keep = kpos <= qpos[..., None]  # (B, L, key_len): never empty, a query sees its own key
    if window is not None:
        keep &= (qpos[..., None] - kpos) < window
    k, v = k_cache[:, :key_len], v_cache[:, :key_len]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep[:, None], scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _sdpa_cached_packed(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, cu_seqlens: Tensor,
                        window: int | None, scale: float | None) -> Tensor:
    """Packed queries, sequence i reading cache row i; one SDPA call per sequence (a prefill: the
    host sync for the bounds is fine here)."""
    bounds, ends = cu_seqlens.tolist(), kv_lengths.tolist()
    outs = []
    for row, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        end = ends[row]
        outs.append(_dense_sdpa(q[:, s:e], k_cache[row: row + 1, :end], v_cache[row: row + 1, :end],
                                end - (e - s), window, scale))
    return torch.cat(outs, dim=1)


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *,
                     cu_seqlens: Tensor | None = None, window: int | None = None, scale: float | None = None,
                     backend: str | None = None, key_len: int | None = None) -> Tensor:
    """Attention of new queries over a KV cache that already holds their keys.

    q (B, L, H, D), or packed (1, T, H, D) with ``cu_seqlens`` (one sequence per cache row);
    k_cache, v_cache (B, max_len, Hkv, D); ``kv_lengths`` (B,) int32: the tokens each row holds,
    the new ones included, so a row's queries sit at its last positions. ``key_len``: an upper
    bound of ``kv_lengths`` known on the host; SDPA then reads only that many cache positions
    (None: all of them, the fixed shape a CUDA graph needs).
    """
    if resolve_cached_backend(backend, q, k_cache) == "fa4":
        return fa4.fa4_cached_attention(q, k_cache, v_cache, kv_lengths, cu_seqlens=cu_seqlens, window=window,
                                        scale=scale)
    if cu_seqlens is not None:
        return _sdpa_cached_packed(q, k_cache, v_cache, kv_lengths, cu_seqlens, window, scale)
    return _sdpa_cached_dense(q, k_cache, v_cache, kv_lengths, window, scale, key_len or k_cache.shape[1])


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
                     window: int | None = None, scale: float | None = None, backend: str | None = None) -> Tensor:
    """Packed input: B = 1 with ``cu_seqlens`` (any lengths), or B > 1 rows of L tokens with
    ``cu_seqlens`` over the flattened B·L tokens, no document crossing a row (training batches)."""
    if resolve_attention_backend(backend, q, k, q_offset) == "fa4":
        if cu_seqlens is not None and q.shape[0] > 1:  # rows of documents: FA4 is varlen already
            B, L = q.shape[:2]
            out = fa4.fa4_attention(*(t.reshape(1, B * L, *t.shape[2:]) for t in (q, k, v)), cu_seqlens=cu_seqlens,
                                    window=window, scale=scale, max_seqlen=L)
            return out.view(q.shape[:-1] + v.shape[-1:])
        return fa4.fa4_attention(q, k, v, cu_seqlens=cu_seqlens, window=window, scale=scale)
    return sdpa_attention(q, k, v, cu_seqlens=cu_seqlens, q_offset=q_offset, window=window, scale=scale)
