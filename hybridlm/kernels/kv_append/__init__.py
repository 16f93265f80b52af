"""A decode step's KV-cache write, RoPE included, as one op.

    q, k = append_kv(q, k, v, cache.k, cache.v, cache.lengths, theta)   # theta None: NoPE; lengths += L

Row b's new keys and values go to positions ``lengths[b] ..`` of the preallocated cache, rotated by
those positions first (RoPE); q and k are returned rotated likewise (a prefill attends over them);
then ``lengths`` advances by L in place (attention reads the new lengths). The torch form is the
positions (an arange, an add, a cast), RoPE, two scatters, the add of the lengths and their copy:
seven to nine kernels an attention layer of every decode step.

Backends (kind ``kv_append``, op ``append_kv``), chosen by :mod:`hybridlm.kernels.registry`:
``reference`` (``reference.py``; every device and dtype) and ``triton`` (``triton.py``: one kernel;
``auto`` on CUDA, on the CPU under ``TRITON_INTERPRET=1`` when asked for by name). No autograd:
while autograd records, the reference runs.
"""
from __future__ import annotations

from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.kv_append import reference

KIND = "kv_append"
OP = "append_kv"

registry.register_reference_and_triton(KIND, OP, reference.append_kv, "hybridlm.kernels.kv_append.triton",
                                       "append_kv")


def append_kv(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
              theta: float | None, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """See the module docstring: q (B, L, Hq, D), k, v (B, L, Hk, D), k_cache, v_cache
    (B, max_len, Hk, D), lengths (B,) int32. ``backend``: a registered ``kv_append`` backend, None or
    ``"auto"``. ``lengths`` advances by L in place. The caller checks the cache has room (no host sync here)."""
    B, L, _, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, L) or k.shape[-1] != D or k_cache.shape != v_cache.shape \
            or k_cache.shape[0] != B or k_cache.shape[2:] != k.shape[2:] or lengths.shape != (B,) \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"append_kv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, caches "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}, lengths {tuple(lengths.shape)} do not fit "
                         "(q (B, L, Hq, D), k and v (B, L, Hk, D), contiguous caches (B, max_len, Hk, D), lengths (B,))")
    if registry.records_autograd(q, k, v):
        return reference.append_kv(q, k, v, k_cache, v_cache, lengths, theta)
    dtypes = (q.dtype, k.dtype, v.dtype, k_cache.dtype, v_cache.dtype)
    name = registry.choose(KIND, OP, backend, q.device.type, q.device.index, dtypes, D, lengths.dtype)
    return registry.implementation(KIND, name, OP)(q, k, v, k_cache, v_cache, lengths, theta)


__all__ = ["append_kv", "KIND", "OP"]
