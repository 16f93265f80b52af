"""The one place that picks a kernel backend.

Backends: ``reference`` (plain PyTorch, chunked; every device), ``sequential`` (the token-by-token
ground truth; slow, for debugging) and ``triton`` (fused chunked scan, forward and backward; CUDA,
or the CPU under ``TRITON_INTERPRET=1``). The choice, in order: the ``backend`` argument (a
block's constructor field), the ``HYBRIDLM_BACKEND`` environment variable, then ``auto``: Triton
for CUDA tensors when Triton imports, the reference otherwise. The Triton backend itself falls
back to the reference, with one warning naming the reason, on inputs its kernels do not cover.
"""
from __future__ import annotations

import os
from typing import Callable

from hybridlm.errors import BackendUnavailable
from hybridlm.kernels import reference

ENV_VAR = "HYBRIDLM_BACKEND"

_SCANS: dict[str, Callable] = {
    "reference": reference.mamba3_chunked,
    "sequential": reference.mamba3_sequential,
}
_STEPS: dict[str, Callable] = {
    "reference": reference.mamba3_step,
    "sequential": reference.mamba3_step,
}
# Backends that will exist but are not built yet, with what to do instead.
_PLANNED = {
    "cute": "the CuTe-DSL step kernel is not part of this release yet; use backend='reference'",
}
_import_errors: dict[str, str] = {}


def _load_triton() -> bool:
    """Register the Triton backend on first use (importing it imports Triton). False if it cannot."""
    if "triton" in _SCANS:
        return True
    if "triton" in _import_errors:
        return False
    try:
        from hybridlm.kernels import triton as triton_kernels
    except ImportError as e:
        _import_errors["triton"] = f"Triton does not import ({e})"
        return False
    # The decode step stays the reference step until the CuTe step lands.
    register_backend("triton", triton_kernels.mamba3_chunked, reference.mamba3_step)
    return True


_LAZY: dict[str, Callable[[], bool]] = {"triton": _load_triton}


def available_backends() -> list[str]:
    return sorted(set(_SCANS) | set(_LAZY))


def register_backend(name: str, scan: Callable, step: Callable) -> None:
    """Add a backend (same signatures as the reference functions)."""
    _SCANS[name] = scan
    _STEPS[name] = step


def resolve_backend(requested: str | None, device_type: str) -> str:
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        return "triton" if device_type == "cuda" and _load_triton() else "reference"
    if name in _SCANS:
        return name
    if name in _LAZY:
        if _LAZY[name]():
            return name
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_import_errors[name]}")
    if name in _PLANNED:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {_PLANNED[name]}")
    raise BackendUnavailable(f"unknown kernel backend {name!r} (from {'argument' if requested else ENV_VAR}); "
                             f"choose one of: auto, {', '.join(available_backends())}")


def mamba3_scan(*args, backend: str | None = None, **kwargs):
    """Chunked Mamba-3 over whole sequences; arguments as :func:`reference.mamba3_chunked`."""
    x = args[2] if len(args) > 2 else kwargs["x"]
    return _SCANS[resolve_backend(backend, x.device.type)](*args, **kwargs)


def mamba3_step(*args, backend: str | None = None, **kwargs):
    """One decode step; arguments as :func:`reference.mamba3_step`."""
    x = args[2] if len(args) > 2 else kwargs["x"]
    return _STEPS[resolve_backend(backend, x.device.type)](*args, **kwargs)
