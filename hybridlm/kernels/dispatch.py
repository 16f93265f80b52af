"""The one place that picks a kernel backend.

Backends: ``reference`` (plain PyTorch, chunked; every device), ``sequential`` (the token-by-token
ground truth; slow, for debugging). Fused GPU backends register here as they land. The choice, in
order: the ``backend`` argument (a block's spec/constructor field), the ``HYBRIDLM_BACKEND``
environment variable, then the best backend available for the tensors' device.
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
    "triton": "the Triton Mamba-3 kernels are not part of this release yet; use backend='reference'",
    "cute": "the CuTe-DSL step kernel is not part of this release yet; use backend='reference'",
}


def available_backends() -> list[str]:
    return sorted(_SCANS)


def register_backend(name: str, scan: Callable, step: Callable) -> None:
    """Add a backend (same signatures as the reference functions)."""
    _SCANS[name] = scan
    _STEPS[name] = step


def resolve_backend(requested: str | None, device_type: str) -> str:
    name = requested or os.environ.get(ENV_VAR) or "auto"
    if name == "auto":
        return "reference"
    if name in _SCANS:
        return name
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
