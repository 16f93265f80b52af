"""The Mamba-3 entry points and backends; the choice of backend is :mod:`hybridlm.kernels.registry`'s.

Backends of ``mamba3`` blocks (ops ``scan``, ``step``, ``inputs``, ``decode_step``, with the
signatures of :mod:`hybridlm.kernels.mamba3.oracle`'s ``mamba3_chunked``, ``mamba3_step``,
``mamba3_inputs`` and ``mamba3_decode_step``):

- ``reference``: plain PyTorch, chunked; every device;
- ``sequential``: the token-by-token ground truth (slow, for debugging);
- ``triton``: the fused chunked scan and per-token inputs (forward and backward) and decode step; CUDA, or the CPU under
  ``TRITON_INTERPRET=1``; what its kernels do not take goes to ``reference``;
- ``cute``: the CuTe-DSL decode step (Hopper and newer, nvidia-cutlass-dsl); everything else, and
  what the kernel does not take, goes to ``triton``.

``auto`` starts at ``cute`` on CUDA (then ``triton``, quietly where a package is absent) and at
``reference`` elsewhere. Support checks, per op (the ``check`` values of
:func:`hybridlm.kernels.registry.choose`): ``scan`` gets stand-ins of q, x and angle_rate (shape
with batch and sequence axes 1, dtype, device: plain values, so the choice stays out of a
``torch.compile`` graph); ``inputs`` gets B's row width, the head count and the inputs' dtypes;
``decode_step`` gets (proj, state, layout), eagerly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hybridlm.kernels import registry
from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import DecodeLayout, DecodeParams, Mamba3State, ScanParams
from hybridlm.kernels.registry import Op

KIND = "mamba3"
ENV_VAR = registry.ENV_VARS[KIND]


class TensorLike(NamedTuple):
    """What a scan support check may read of a tensor."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _plain(t: Tensor | None):
    """(shape, dtype) of a scan input as plain values; batch and sequence axes (which may be
    symbolic under torch.compile) are given as 1."""
    return None if t is None else ((1, 1, *(int(n) for n in t.shape[2:])), t.dtype)


def _scan_check(check):
    """A scan support check taking tensors, fed stand-ins built from :func:`_plain` values."""
    def unsupported_reason(device: torch.device, q, x, angle_rate) -> str | None:
        like = [None if p is None else TensorLike(p[0], p[1], device) for p in (q, x, angle_rate)]
        return check(*like)
    return unsupported_reason


def _decode_check(check):
    return lambda device, proj, state, layout: check(proj, state, layout)


def _triton_ops():
    from hybridlm.kernels.mamba3 import triton as kernels

    from hybridlm.kernels.mamba3.triton import inputs

    return {"scan": Op(kernels.mamba3_chunked, _scan_check(kernels.unsupported_reason)),
            "inputs": Op(inputs.mamba3_inputs, inputs.unsupported_reason),
            "decode_step": Op(kernels.mamba3_decode_step, _decode_check(kernels.step_unsupported_reason))}


def _cute_ops():
    from hybridlm.kernels.mamba3 import cute as kernels

    error = kernels.import_error()
    if error:
        raise ImportError(error)
    return {"decode_step": Op(kernels.mamba3_decode_step, _decode_check(kernels.unsupported_reason))}


registry.register_backend(KIND, "reference", {"scan": oracle.mamba3_chunked, "step": oracle.mamba3_step,
                                              "inputs": oracle.mamba3_inputs,
                                              "decode_step": oracle.mamba3_decode_step}, auto_priority=0)
registry.register_backend(KIND, "sequential", {"scan": oracle.mamba3_sequential, "step": oracle.mamba3_step,
                                               "inputs": oracle.mamba3_inputs,
                                               "decode_step": oracle.mamba3_decode_step})
registry.register_backend(KIND, "triton", load=_triton_ops, fallback="reference", auto_priority=1,
                          auto_devices=("cuda",), installed=registry.installed("triton"))
registry.register_backend(KIND, "cute", load=_cute_ops, fallback="triton", auto_priority=2, auto_devices=("cuda",),
                          installed=registry.installed("cutlass"))


def mamba3_scan(q: Tensor, k: Tensor, x: Tensor, dt: Tensor, adt: Tensor, lam: Tensor, angle_rate: Tensor | None,
                params: ScanParams = ScanParams(), *, backend: str | None = None, **kwargs):
    """Chunked Mamba-3 over whole sequences; arguments as :func:`oracle.mamba3_chunked`."""
    name = registry.choose(KIND, "scan", backend, x.device.type, x.device.index, _plain(q), _plain(x),
                           _plain(angle_rate))
    return registry.implementation(KIND, name, "scan")(q, k, x, dt, adt, lam, angle_rate, params, **kwargs)


def mamba3_inputs(b: Tensor, c: Tensor, dd_dt: Tensor, dd_a: Tensor, trap: Tensor | None, dt_bias: Tensor,
                  b_norm: Tensor, c_norm: Tensor, *, backend: str | None = None, **kwargs):
    """The scan's per-token inputs from in_proj's segments; arguments as :func:`oracle.mamba3_inputs`."""
    dtypes = tuple(t.dtype for t in (b, c, dd_dt, dd_a, trap, b_norm, c_norm) if t is not None)
    name = registry.choose(KIND, "inputs", backend, b.device.type, b.device.index, int(b.shape[-1]),
                           int(dd_dt.shape[-1]), dtypes)
    return registry.implementation(KIND, name, "inputs")(b, c, dd_dt, dd_a, trap, dt_bias, b_norm, c_norm, **kwargs)


def mamba3_step(*args, backend: str | None = None, **kwargs):
    """One token of the recurrence; arguments as :func:`oracle.mamba3_step`."""
    x = args[2] if len(args) > 2 else kwargs["x"]
    name = registry.choose(KIND, "step", backend, x.device.type, x.device.index)
    return registry.implementation(KIND, name, "step")(*args, **kwargs)


@torch.compiler.disable  # inference only, one kernel a layer; dynamo would trace into the CuTe DSL's JIT
def mamba3_decode_step(proj: Tensor, state: Mamba3State, params: DecodeParams, layout: DecodeLayout, *,
                       backend: str | None = None) -> Tensor:
    """One token of a whole layer after in_proj, the state in place; as
    :func:`oracle.mamba3_decode_step`. A kernel that cannot take the inputs passes them on."""
    name = registry.choose(KIND, "decode_step", backend, proj.device.type, proj.device.index, proj, state, layout)
    return registry.implementation(KIND, name, "decode_step")(proj, state, params, layout)
