"""The GEMVs of a decode step, with what surrounds them in the block, as one op each.

    hidden = silu_mul_gemv(x, w1.weight, w3.weight)                  # SwiGLU: then w2(hidden)
    y, stream = norm_gemv(h, residual, norm.weight, norm.eps, w)     # a block boundary + its first projection
    y, stream = norm_gemv(h, residual, norm.weight, norm.eps, w1, w3)  # ... + SwiGLU's w1, w3 and gate
    qkv, stream = norm_gemv(h, residual, norm.weight, norm.eps, wq, stacked=(wk, wv))  # ... + q, k, v
    y = linear(o, out_proj.weight)                                   # a plain projection (out_proj, w2, wo)

``norm_gemv`` is the residual add and RMSNorm of a block boundary
(:func:`hybridlm.kernels.rmsnorm.add_rms_norm`) followed by the block's first projection, so a
decode step need not launch a norm kernel before each block (nor three GEMVs for q, k and v).

``linear`` is cuBLAS's GEMV unless ``PLAIN_GEMVS`` (or a named backend) sends it to the kernel:
with the kernel's PDL, a chain of GEMVs overlaps each one's start with the end of the one before.

Backends (kind ``decode_gemv``, ops ``silu_mul_gemv``, ``norm_gemv`` and ``gemv``), chosen by
:mod:`hybridlm.kernels.registry`: ``reference`` (``reference.py``: the norm, GEMMs and gate as
plain ops, every device, dtype and size) and ``triton`` (``triton.py``: one kernel for inputs of at
most ``MAX_ROWS`` rows; ``auto`` on CUDA, on the CPU under ``TRITON_INTERPRET=1`` when asked for by
name). No autograd: the blocks call these only while autograd does not record, and only for
decode-sized inputs (:func:`backend_for`).
"""
from __future__ import annotations

from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.decode_gemv import reference

KIND = "decode_gemv"
MAX_ROWS = 16  # rows the fused kernel takes (one tensor-core tile): decode steps up to batch 16
# linear() through the kernel when no backend is named (else cuBLAS: F.linear): alone cuBLAS's split-K pair
# is about as fast, but in a step the kernel's PDL overlaps each GEMV with the one before (hybrid-1.5b at
# batch 1, H200, 2026-12-03: 1.269 against 1.325 ms a step; benchmarks/decode_profile.py)
PLAIN_GEMVS = True
# Mamba-3's in_proj with its block boundary in the kernel when the block names no backend (else the
# separate norm kernel and cuBLAS, measured faster alone: hybridlm/blocks/mamba3.py normed_forward)
NORM_IN_PROJ = False
# Mamba-3's in_proj as a plain GEMV in the kernel (after the separate fused norm) when NORM_IN_PROJ is off: it
# joins the PDL chain of the other GEMVs, where cuBLAS's GEMV breaks it (to be timed: decode_profile.py)
PLAIN_IN_PROJ = False

registry.register_reference_and_triton_ops(KIND, "hybridlm.kernels.decode_gemv.triton", {
    "silu_mul_gemv": (reference.silu_mul_gemv, "silu_mul_gemv"),
    "norm_gemv": (reference.norm_gemv, "norm_gemv"), "gemv": (reference.gemv, "gemv")})


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def backend_for(op: str, x: Tensor, *tensors: Tensor | None, backend: str | None = None,
                stacked_rows: tuple[int, ...] = ()) -> str:
    """The backend that would run ``op`` on these inputs (x, then the op's other tensors in order;
    ``stacked_rows``: the rows of w and w2 when three weights are stacked): ``reference`` for more than
    ``MAX_ROWS`` rows (a prefill or training batch: cuBLAS GEMMs are the right tool there, no warning),
    else the registry's."""
    if _rows(x) > MAX_ROWS:
        return "reference"
    dtypes = (x.dtype, *(None if t is None else t.dtype for t in tensors))
    # the op again among the checked values: the kernel module's one support check serves both ops
    return registry.choose(KIND, op, backend, x.device.type, x.device.index, op, dtypes, _rows(x), stacked_rows)


def silu_mul_gemv(x: Tensor, w1: Tensor, w3: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(x w1ᵀ) * (x w3ᵀ): x (..., d_model), w1 and w3 (hidden, d_model) -> (..., hidden).
    ``backend``: a registered ``decode_gemv`` backend, None or ``"auto"``."""
    if w1.shape != w3.shape or x.shape[-1] != w1.shape[-1]:
        raise ValueError(f"silu_mul_gemv: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)} "
                         "do not fit (w1 and w3 (hidden, d_model), x (..., d_model))")
    if registry.records_autograd(x, w1, w3):
        return reference.silu_mul_gemv(x, w1, w3)
    name = backend_for("silu_mul_gemv", x, w1, w3, backend=backend)
    return registry.implementation(KIND, name, "silu_mul_gemv")(x, w1, w3)


def norm_gemv(h: Tensor, residual: Tensor | None, norm_weight: Tensor, eps: float, w: Tensor,
              w_up: Tensor | None = None, *, stacked: tuple[Tensor, Tensor] | None = None,
              backend: str | None = None) -> tuple[Tensor, Tensor]:
    """h, residual (..., d_model) -> (rms_norm(h + residual) wᵀ, or silu(· wᵀ) * (· w_upᵀ) with ``w_up``,
    or (· wᵀ, · w2ᵀ, · w3ᵀ) side by side with ``stacked = (w2, w3)``, (..., N) in w's dtype; the
    stream h + residual in h's dtype). ``residual=None``: no add, the stream is h. w, w_up, w2, w3
    (rows, d_model); norm_weight (d_model,)."""
    d_model = h.shape[-1]
    weights = [w, *(stacked or ())]
    if (residual is not None and residual.shape != h.shape) or norm_weight.shape != (d_model,) \
            or any(t.dim() != 2 or t.shape[-1] != d_model for t in weights) \
            or (w_up is not None and (w_up.shape != w.shape or stacked is not None)):
        raise ValueError(f"norm_gemv: h {tuple(h.shape)}, residual {None if residual is None else tuple(residual.shape)}, "
                         f"norm_weight {tuple(norm_weight.shape)}, weights {[tuple(t.shape) for t in weights]}, "
                         f"w_up {None if w_up is None else tuple(w_up.shape)} do not fit (h and residual (..., d_model), "
                         "norm_weight (d_model,), weights (rows, d_model), w_up as w and not with stacked weights)")
    if registry.records_autograd(h, residual, norm_weight, w_up, *weights):
        return reference.norm_gemv(h, residual, norm_weight, eps, w, w_up, stacked)
    name = backend_for("norm_gemv", h, residual, norm_weight, w, w_up, *(stacked or (None, None)), backend=backend,
                       stacked_rows=() if stacked is None else (w.shape[0], stacked[0].shape[0]))
    return registry.implementation(KIND, name, "norm_gemv")(h, residual, norm_weight, eps, w, w_up, stacked)


def linear(x: Tensor, w: Tensor, *, backend: str | None = None) -> Tensor:
    """x wᵀ: x (..., K), w (N, K) -> (..., N), as ``F.linear`` (no bias). A decode-sized input without
    autograd goes to the registry's ``gemv`` when ``backend`` is named or ``PLAIN_GEMVS`` is set."""
    if x.shape[-1] != w.shape[-1] or w.dim() != 2:
        raise ValueError(f"linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not fit (w (N, K), x (..., K))")
    if (backend is None and not PLAIN_GEMVS) or registry.records_autograd(x, w):
        return reference.gemv(x, w)
    name = backend_for("gemv", x, w, backend=backend)
    return registry.implementation(KIND, name, "gemv")(x, w)


__all__ = ["silu_mul_gemv", "norm_gemv", "linear", "backend_for", "KIND", "MAX_ROWS"]
