"""Kernels: tensors in, tensors out. ``reference`` is the ground truth; ``dispatch`` picks a backend."""
from hybridlm.kernels.dispatch import (
    available_backends, mamba3_scan, mamba3_step, register_backend, resolve_backend,
)
from hybridlm.kernels.mamba3.contract import Mamba3State
from hybridlm.kernels.mamba3.shared import causal_conv1d

__all__ = ["available_backends", "mamba3_scan", "mamba3_step", "register_backend", "resolve_backend",
           "Mamba3State", "causal_conv1d"]
