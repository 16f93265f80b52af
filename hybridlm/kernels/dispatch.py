"""The one place that picks a kernel backend.

Backends: ``reference`` (plain PyTorch, chunked; every device), ``sequential`` (the token-by-token
ground truth; slow, for debugging) and ``triton`` (fused chunked scan, forward and backward; CUDA,
or the CPU under ``TRITON_INTERPRET=1``). The choice, in order: the ``backend`` argument (a
block's constructor field), the ``HYBRIDLM_BACKEND`` environment variable, then ``auto``: Triton
for CUDA tensors when Triton imports, the reference otherwise. The Triton backend itself falls
back to the reference, with one warning naming the reason, on inputs its kernels do not cover.

The decode step of a whole layer (:func:`mamba3_decode_step`) has its own chain: ``cute`` (the
CuTe-DSL kernel; CUDA with nvidia-cutlass-dsl), then ``triton``, then ``reference``; ``auto`` on
CUDA starts at the first that imports, and a kernel that cannot take some input hands it to the
next one with one warning naming the reason.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

import torch

from hybridlm.errors import BackendUnavailable
from hybridlm.kernels.mamba3 import oracle

ENV_VAR = "HYBRIDLM_BACKEND"

_SCANS: dict[str, Callable] = {
    "reference": oracle.mamba3_chunked,
    "sequential": oracle.mamba3_sequential,
}
_STEPS: dict[str, Callable] = {
    "reference": oracle.mamba3_step,
    "sequential": oracle.mamba3_step,
}
_import_errors: dict[str, str] = {}


class DecodeKernel(NamedTuple):
    step: Callable  # as oracle.mamba3_decode_step
    unsupported_reason: Callable  # (proj, state, layout) -> str | None


_DECODE: dict[str, DecodeKernel] = {
    "reference": DecodeKernel(oracle.mamba3_decode_step, lambda *a: None),
    "sequential": DecodeKernel(oracle.mamba3_decode_step, lambda *a: None),
}
_DECODE_FALLBACK = {"cute": "triton", "triton": "reference"}
_warned: set[str] = set()


def _load_triton() -> bool:
    """Register the Triton backend on first use (importing it imports Triton). False if it cannot."""
    if "triton" in _SCANS:
        return True
    if "triton" in _import_errors:
        return False
    try:
        from hybridlm.kernels.mamba3 import triton as triton_kernels
    except ImportError as e:
        _import_errors["triton"] = f"Triton does not import ({e})"
        return False
    register_backend("triton", triton_kernels.mamba3_chunked, oracle.mamba3_step,
                     DecodeKernel(triton_kernels.mamba3_decode_step, triton_kernels.step_unsupported_reason))
    return True


def _load_cute() -> bool:
    """The CuTe backend: the CuTe-DSL decode step, with the Triton scan for prefill."""
    if "cute" in _SCANS:
        return True
    if "cute" in _import_errors:
        return False
    if not _load_triton():
        _import_errors["cute"] = _import_errors["triton"]
        return False
    from hybridlm.kernels.mamba3 import cute as cute_kernels

    error = cute_kernels.import_error()
    if error:
        _import_errors["cute"] = error
        return False
    register_backend("cute", _SCANS["triton"], oracle.mamba3_step,
                     DecodeKernel(cute_kernels.mamba3_decode_step, cute_kernels.unsupported_reason))
    return True


_LAZY: dict[str, Callable[[], bool]] = {"triton": _load_triton, "cute": _load_cute}


def available_backends() -> list[str]:
    return sorted(set(_SCANS) | set(_LAZY))


def register_backend(name: str, scan: Callable, step: Callable, decode: DecodeKernel | None = None) -> None:
    """Add a backend (same signatures as the reference functions)."""
    _SCANS[name] = scan
    _STEPS[name] = step
    _DECODE[name] = decode or _DECODE["reference"]


@torch.compiler.assume_constant_result  # under torch.compile: run once while tracing, never traced
def resolve_backend(requested: str | None, device_type: str) -> str:
    """The backend name for this request and device type. It takes plain values so that dynamo
    calls it instead of tracing it: the lazy import and registration of Triton happen outside
    the graph (traced, they would be side effects that break an activation-checkpointed block)."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        return "triton" if device_type == "cuda" and _load_triton() else "reference"
    if name in _SCANS:
        return name
    if name in _LAZY:
        if _LAZY[name]():
            return name
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_import_errors[name]}")
    raise BackendUnavailable(f"unknown kernel backend {name!r} (from {'argument' if requested else ENV_VAR}); "
                             f"choose one of: auto, {', '.join(available_backends())}")


def mamba3_scan(*args, backend: str | None = None, **kwargs):
    """Chunked Mamba-3 over whole sequences; arguments as :func:`oracle.mamba3_chunked`."""
    x = args[2] if len(args) > 2 else kwargs["x"]
    return _SCANS[resolve_backend(backend, x.device.type)](*args, **kwargs)


def mamba3_step(*args, backend: str | None = None, **kwargs):
    """One decode step; arguments as :func:`oracle.mamba3_step`."""
    x = args[2] if len(args) > 2 else kwargs["x"]
    return _STEPS[resolve_backend(backend, x.device.type)](*args, **kwargs)


@torch.compiler.assume_constant_result
def resolve_decode_backend(requested: str | None, device_type: str) -> str:
    """Like :func:`resolve_backend`, but ``auto`` on CUDA prefers the CuTe step kernel."""
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name == "auto" and device_type == "cuda":
        return "cute" if _load_cute() else resolve_backend("auto", device_type)
    return resolve_backend(requested, device_type)


def mamba3_decode_step(proj, state, params, layout, *, backend: str | None = None):
    """One token of a whole layer after in_proj, the state in place; as
    :func:`oracle.mamba3_decode_step`. A kernel that cannot take the inputs passes them on."""
    name = resolve_decode_backend(backend, proj.device.type)
    while True:
        kernel = _DECODE[name]
        reason = kernel.unsupported_reason(proj, state, layout)
        if reason is None:
            return kernel.step(proj, state, params, layout)
        fallback = _DECODE_FALLBACK.get(name, "reference")
        if fallback == "triton" and not _load_triton():
            fallback = "reference"
        message = f"Mamba-3 {name} decode step: using {fallback} instead: {reason}"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=2)
        name = fallback
