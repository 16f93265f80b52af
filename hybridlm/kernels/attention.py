"""Causal attention on tensors: q (B, L, H, D); k, v (B, Lk, Hkv, D) -> (B, L, H, D).

``q_offset`` is the absolute position of q's first token among the keys (decode / chunked
prefill from a KV cache); ``window`` keeps a key j for query i only when i - j < window.
Packed input is B = 1 with ``cu_seqlens``.

:func:`cached_attention` reads keys from a preallocated KV cache (B, max_len, Hkv, D) whose rows hold
different numbers of tokens (``kv_lengths``); the queries are the last tokens of each row. Its
decode form (dense queries) has fixed shapes and no host sync, so it can run inside a CUDA graph.

A decode step (dense, one query a row) is the op ``decode``: on CUDA ``auto`` takes the Triton
split-KV kernel (``hybridlm/kernels/decode_attention/``, backend ``triton``: it has only that op, so
for the others it hands over to FA4, then SDPA); FA4 and SDPA run it as their cached form.

Backends of ``attention`` blocks (ops ``causal``, ``cached`` and ``decode``), chosen by
:mod:`hybridlm.kernels.registry`: ``fa4`` (FlashAttention-4 on Hopper and newer, bf16/fp16; a
forced ``fa4`` that cannot run raises one error naming why) and ``sdpa`` (PyTorch's
scaled_dot_product_attention: every device and dtype). ``auto`` takes FA4 on CUDA where it imports
and takes the inputs, SDPA otherwise: quietly where FA4 is not installed or the GPU is older than
Hopper, with one warning naming the reason where FA4 is installed but does not import or refuses
the inputs. The support check gets plain values (device, dtypes, head_dim, whether the queries end
where the keys end), so under ``torch.compile`` the choice is made once per trace, outside the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridlm.kernels import fa4, registry
from hybridlm.kernels.registry import Op

KIND = "attention"


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


def _fa4_ops():
    error = fa4.import_error()
    if error:
        raise ImportError(error)
    return {"causal": Op(fa4_causal, fa4.unsupported_reason_for), "cached": Op(_fa4_cached, fa4.unsupported_reason_for),
            "decode": Op(_fa4_cached, fa4.unsupported_reason_for)}


def resolve_attention_backend(requested: str | None, q: Tensor, k: Tensor, q_offset: int = 0) -> str:
    """The backend of :func:`causal_attention` for these inputs."""
    aligned = not q_offset or k.shape[1] == q_offset + q.shape[1]
    return registry.choose(KIND, "causal", requested, q.device.type, q.device.index, q.dtype, k.dtype,
                           int(q.shape[-1]), aligned)


def resolve_cached_backend(requested: str | None, q: Tensor, k_cache: Tensor) -> str:
    """The backend of :func:`cached_attention` for these inputs.

    ``auto`` takes FA4's KV-cache entry (``seqused_k``) where FA4 takes the inputs; it is checked
    against SDPA and for bitwise CUDA-graph replay in tests/gpu/test_decode_gpu.py.
    """
    return _choose_over_cache("cached", requested, q, k_cache)


def resolve_decode_backend(requested: str | None, q: Tensor, k_cache: Tensor) -> str:
    """The backend of :func:`cached_attention` for a decode step (dense, one query a row): ``auto``
    takes the Triton split-KV kernel where it is the measured choice (``DECODE_AUTO``), else FA4's
    cached form, else SDPA's."""
    return _choose_over_cache("decode", requested, q, k_cache)


def _choose_over_cache(op: str, requested: str | None, q: Tensor, k_cache: Tensor) -> str:
    # the queries end where the cache's keys end (aligned), whatever the row's length
    return registry.choose(KIND, op, requested, q.device.type, q.device.index, q.dtype, k_cache.dtype,
                           int(q.shape[-1]), True)


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
    if cu_seqlens is None and q.shape[1] == 1:  # a decode step: the op ``decode`` (kernels/decode_attention/)
        run = registry.implementation(KIND, resolve_decode_backend(backend, q, k_cache), "decode")
        return run(q, k_cache, v_cache, kv_lengths, window=window, scale=scale, key_len=key_len)
    run = registry.implementation(KIND, resolve_cached_backend(backend, q, k_cache), "cached")
    return run(q, k_cache, v_cache, kv_lengths, cu_seqlens=cu_seqlens, window=window, scale=scale, key_len=key_len)


def sdpa_cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *,
                          cu_seqlens: Tensor | None = None, window: int | None = None, scale: float | None = None,
                          key_len: int | None = None) -> Tensor:
    """:func:`cached_attention` on SDPA."""
    if cu_seqlens is not None:
        return _sdpa_cached_packed(q, k_cache, v_cache, kv_lengths, cu_seqlens, window, scale)
    return _sdpa_cached_dense(q, k_cache, v_cache, kv_lengths, window, scale, key_len or k_cache.shape[1])


def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
                     window: int | None = None, scale: float | None = None, backend: str | None = None) -> Tensor:
    """Packed input: B = 1 with ``cu_seqlens`` (any lengths), or B > 1 rows of L tokens with
    ``cu_seqlens`` over the flattened B·L tokens, no document crossing a row (training batches)."""
    run = registry.implementation(KIND, resolve_attention_backend(backend, q, k, q_offset), "causal")
    return run(q, k, v, cu_seqlens=cu_seqlens, q_offset=q_offset, window=window, scale=scale)


def fa4_causal(q: Tensor, k: Tensor, v: Tensor, *, cu_seqlens: Tensor | None = None, q_offset: int = 0,
               window: int | None = None, scale: float | None = None) -> Tensor:
    """:func:`causal_attention` on FA4 (which the support check let through: ``q_offset`` aligned)."""
    if cu_seqlens is not None and q.shape[0] > 1:  # rows of documents: FA4 is varlen already
        B, L = q.shape[:2]
        out = fa4.fa4_attention(*(t.reshape(1, B * L, *t.shape[2:]) for t in (q, k, v)), cu_seqlens=cu_seqlens,
                                window=window, scale=scale, max_seqlen=L)
        return out.view(q.shape[:-1] + v.shape[-1:])
    return fa4.fa4_attention(q, k, v, cu_seqlens=cu_seqlens, window=window, scale=scale)


def _fa4_cached(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_lengths: Tensor, *, key_len: int | None = None,
                **kwargs) -> Tensor:
    return fa4.fa4_cached_attention(q, k_cache, v_cache, kv_lengths, **kwargs)  # reads every row's own length


def _triton_ops():
    from hybridlm.kernels.decode_attention import triton as kernel

    return {"decode": Op(kernel.decode_attention, kernel.unsupported_reason)}


# Whether ``auto`` takes the Triton decode kernel over FA4 for decode steps: hybrid-1.5b at batch 1 (2K
# context) 1.269 against 1.325 ms a step, transformer-1.5b 1.49 against 1.95 (H200, 2026-12-03,
# benchmarks/decode_profile.py --attention auto,triton; FA4 has no split-KV on SM 9.0).
DECODE_AUTO = True

registry.register_backend(KIND, "sdpa", {"causal": sdpa_attention, "cached": sdpa_cached_attention,
                                         "decode": sdpa_cached_attention}, auto_priority=0)
registry.register_backend(KIND, "fa4", load=_fa4_ops, fallback="sdpa", strict=True, auto_priority=1,
                          installed=fa4.installed, device_reason=lambda device: fa4.device_reason(device, "FA4"))
registry.register_backend(KIND, "triton", load=_triton_ops, fallback="fa4", auto_priority=2 if DECODE_AUTO else None,
                          auto_devices=("cuda",), installed=registry.installed("triton"))
